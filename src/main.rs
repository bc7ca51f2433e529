use clap::Parser;

fn main() {
    let code = if vmdb::cli::called_as_vmdb2(std::env::args_os().next().as_deref()) {
        vmdb::app::main_vmdb2(vmdb::cli::Vmdb2Cli::parse())
    } else {
        vmdb::app::main(vmdb::cli::Cli::parse())
    };
    std::process::exit(code);
}
