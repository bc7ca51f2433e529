use clap::Parser;

fn main() {
    let cli = vmdb::cli::Cli::parse();
    std::process::exit(vmdb::app::main(cli));
}
