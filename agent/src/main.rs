//! `portfleet-agent`.

use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "portfleet-agent", version, about = "The portfleet scanning agent.")]
struct Cli {}

fn main() {
    let _ = Cli::parse();
}
