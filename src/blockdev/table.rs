//! placeholder until the table module lands
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelKind {
    Msdos,
    Gpt,
}
