//! `weft-redirector`: `init` installs the redirect rules in the current network namespace (the
//! injected init step; in eBPF mode it checks the node agent took the pod), `cleanup` removes
//! them, `node` runs the eBPF node agent.
#![forbid(unsafe_code)]

use std::io::IsTerminal as _;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use tracing::info;
use tracing_subscriber::EnvFilter;
use weft_api::redirect::InterceptionMode;
use weft_redirector::cli::{CleanupCommand, Cli, Command, InitCommand, NodeCommand};
use weft_redirector::{apply, ebpf, iptables, node};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("weft-redirector: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init(init) => run_init(&init),
        Command::Cleanup(cleanup) => run_cleanup(&cleanup),
        Command::Node(cmd) => run_node(&cmd),
    }
}

fn run_node(cmd: &NodeCommand) -> anyhow::Result<()> {
    if cmd.uninstall {
        let n = node::uninstall(cmd).context("uninstalling")?;
        println!("removed {n} pins from {}", cmd.layout().root.display());
        return Ok(());
    }
    if cmd.check {
        let hooks = node::check(cmd)?;
        for h in &hooks {
            match &h.result {
                Ok(()) => println!("ok       {}", h.name),
                Err(why) => println!("MISSING  {}: {why}", h.name),
            }
        }
        return Ok(node::require(&hooks)?);
    }
    Ok(node::run(cmd)?)
}

fn run_init(cmd: &InitCommand) -> anyhow::Result<()> {
    let args = cmd.redirect.to_init_args();
    info!(?args, dry_run = cmd.dry_run, "init");
    match args.mode {
        InterceptionMode::Redirect if cmd.dry_run => {
            print!("{}", iptables::dry_run(&args));
            Ok(())
        }
        InterceptionMode::Redirect => {
            apply::init(&args, &cmd.binaries.tools()).context("installing redirect rules")
        }
        InterceptionMode::Ebpf => Ok(ebpf::verify(
            &args,
            std::time::Duration::from_secs(cmd.ebpf_timeout),
        )?),
        InterceptionMode::None => {
            info!("interception mode none: nothing to install");
            Ok(())
        }
    }
}

fn run_cleanup(cmd: &CleanupCommand) -> anyhow::Result<()> {
    apply::cleanup(&cmd.binaries.tools()).context("removing redirect rules")
}

/// Logs to stderr (stdout carries `--dry-run` output); `RUST_LOG` filters, `LOG_FORMAT=json`
/// is for machines.
fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if std::env::var(weft_api::bootstrap::ENV_LOG_FORMAT).is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
