//! The command line. `init` takes exactly the flags of the injector's contract
//! ([`weft_api::redirect::InitArgs::to_args`]), parsed with the contract's own list parsers,
//! plus local options (`--dry-run`, the binaries to run) that the injector never sets.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use weft_api::bootstrap::{PORT_INBOUND, PORT_OUTBOUND, PROXY_UID};
use weft_api::redirect::{
    CidrSet, InitArgs, InterceptionMode, ListError, PortSet, parse_cidrs, parse_interfaces,
    parse_ports,
};

use crate::apply::{
    ENV_IP6TABLES_RESTORE, ENV_IP6TABLES_SAVE, ENV_IPTABLES_RESTORE, ENV_IPTABLES_SAVE,
    FamilyTools, Tool, Tools,
};

/// `weft-redirector`: sends a pod's traffic to its Weft proxy.
#[derive(Debug, Parser)]
#[command(name = "weft-redirector", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Install the NAT rules that send the pod's TCP traffic to the proxy (the injected init step).
    Init(InitCommand),
    /// Remove Weft's chains and the jumps to them, and nothing else.
    Cleanup(CleanupCommand),
    /// Run the eBPF node agent (the DaemonSet): load and attach the programs, keep the maps
    /// equal to the meshed pods.
    Node(NodeCommand),
}

/// `weft-redirector init`.
#[derive(Debug, Args)]
pub struct InitCommand {
    /// The redirection wanted (the injector's flags).
    #[command(flatten)]
    pub redirect: RedirectFlags,
    /// Print the iptables-restore input of each family and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// eBPF mode: how long to wait for the node agent to take the pod, in seconds.
    #[arg(long, value_name = "SECONDS", env = crate::ebpf::ENV_VERIFY_TIMEOUT, default_value_t = 60)]
    pub ebpf_timeout: u64,
    /// The binaries to run.
    #[command(flatten)]
    pub binaries: BinaryFlags,
}

/// `weft-redirector node`.
#[derive(Debug, Args)]
pub struct NodeCommand {
    /// The eBPF object (default: `weft-ebpf.o` beside this executable).
    #[arg(long, value_name = "PATH", env = crate::node::bpf::ENV_BPF_OBJECT)]
    pub bpf_object: Option<PathBuf>,
    /// Name of this agent's instance; its pins live in `/sys/fs/bpf/weft/<instance>`.
    #[arg(long, value_name = "NAME", default_value = "default")]
    pub instance: String,
    /// Directory of the pins (overrides `--instance`); must be on bpffs.
    #[arg(long, value_name = "DIR")]
    pub bpffs: Option<PathBuf>,
    /// cgroup v2 directory the programs attach to: processes in it and below are redirected
    /// when their pod is meshed (a local node's subtree; Kubernetes' kubepods cgroup).
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// Local node: directory of pod files (`<namespace>_<name>.json`).
    #[arg(long, value_name = "DIR", conflicts_with = "node_name")]
    pub pods_dir: Option<PathBuf>,
    /// Kubernetes: this node's name; the pods scheduled on it are watched.
    #[arg(long, value_name = "NAME", env = "WEFT_NODE_NAME")]
    pub node_name: Option<String>,
    /// Address serving `/healthz` and `/metrics`.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15014")]
    pub listen: SocketAddr,
    /// Which app↔proxy bytes `sk_msg` moves socket to socket: `to-proxy` (the default), `both`
    /// (also towards apps: faster, but an app reading with splice(2), as Go's io.Copy between
    /// TCP connections does, would not see them), or `off`.
    #[arg(long, value_name = "WHICH", value_enum, default_value_t = ShortCircuit::ToProxy)]
    pub short_circuit: ShortCircuit,
    /// How often the pods directory is read, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    pub poll_ms: u64,
    /// Report which hooks this kernel supports and exit (non-zero when one is missing).
    #[arg(long, conflicts_with = "uninstall")]
    pub check: bool,
    /// Detach the programs and remove this instance's pins, then exit.
    #[arg(long)]
    pub uninstall: bool,
}

/// `weft-redirector node --short-circuit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ShortCircuit {
    /// Every byte takes the TCP path.
    Off,
    /// The app's bytes go straight to its proxy.
    ToProxy,
    /// Both directions.
    Both,
}

impl ShortCircuit {
    /// The pod flags that say so.
    pub fn flags(self) -> u32 {
        use weft_ebpf_maps::pod_flags;
        match self {
            ShortCircuit::Off => 0,
            ShortCircuit::ToProxy => pod_flags::SHORT_CIRCUIT_TO_PROXY,
            ShortCircuit::Both => pod_flags::SHORT_CIRCUIT,
        }
    }
}

/// `weft-redirector cleanup`.
#[derive(Debug, Args)]
pub struct CleanupCommand {
    /// The binaries to run.
    #[command(flatten)]
    pub binaries: BinaryFlags,
}

// Aliases keep clap from reading `Vec<T>` as a repeatable flag: each of these is one flag
// holding a comma-separated list.
type Ports = Vec<u16>;
type Cidrs = Vec<IpNet>;
type Interfaces = Vec<String>;

/// The flags of [`InitArgs`], with its defaults.
#[derive(Debug, Args)]
pub struct RedirectFlags {
    /// Interception mode: redirect, ebpf or none.
    #[arg(long, value_name = "MODE", default_value = "redirect", value_parser = mode)]
    pub mode: InterceptionMode,
    /// UID whose traffic is never redirected (the proxy's).
    #[arg(long, value_name = "UID", default_value_t = PROXY_UID)]
    pub proxy_uid: u32,
    /// GID whose traffic is never redirected (the proxy's).
    #[arg(long, value_name = "GID", default_value_t = PROXY_UID)]
    pub proxy_gid: u32,
    /// Port of the proxy's outbound listener.
    #[arg(long, value_name = "PORT", default_value_t = PORT_OUTBOUND, value_parser = port)]
    pub outbound_port: u16,
    /// Port of the proxy's inbound listener.
    #[arg(long, value_name = "PORT", default_value_t = PORT_INBOUND, value_parser = port)]
    pub inbound_port: u16,
    /// Destinations redirected outbound: `*`, or comma-separated CIDRs (IPv4 and IPv6).
    #[arg(long, value_name = "CIDRS", default_value = "*", value_parser = CidrSet::parse)]
    pub include_outbound_cidrs: CidrSet,
    /// Destinations never redirected: comma-separated CIDRs.
    #[arg(long, value_name = "CIDRS", default_value = "", value_parser = cidrs)]
    pub exclude_outbound_cidrs: Cidrs,
    /// Inbound ports redirected: `*`, or comma-separated ports.
    #[arg(long, value_name = "PORTS", default_value = "*", value_parser = PortSet::parse)]
    pub include_inbound_ports: PortSet,
    /// Inbound ports never redirected (the proxy's own included), comma-separated.
    #[arg(long, value_name = "PORTS", default_value = "15020,15021,15090", value_parser = ports)]
    pub exclude_inbound_ports: Ports,
    /// Outbound ports redirected whatever the destination, comma-separated.
    #[arg(long, value_name = "PORTS", default_value = "", value_parser = ports)]
    pub include_outbound_ports: Ports,
    /// Outbound ports never redirected, comma-separated.
    #[arg(long, value_name = "PORTS", default_value = "", value_parser = ports)]
    pub exclude_outbound_ports: Ports,
    /// Interfaces whose traffic is never redirected, comma-separated.
    #[arg(long, value_name = "NAMES", default_value = "", value_parser = interfaces)]
    pub exclude_interfaces: Interfaces,
}

impl RedirectFlags {
    /// The contract's view of the flags.
    pub fn to_init_args(&self) -> InitArgs {
        InitArgs {
            mode: self.mode,
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid,
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            include_outbound_cidrs: self.include_outbound_cidrs.clone(),
            exclude_outbound_cidrs: self.exclude_outbound_cidrs.clone(),
            include_inbound_ports: self.include_inbound_ports.clone(),
            exclude_inbound_ports: self.exclude_inbound_ports.clone(),
            include_outbound_ports: self.include_outbound_ports.clone(),
            exclude_outbound_ports: self.exclude_outbound_ports.clone(),
            exclude_interfaces: self.exclude_interfaces.clone(),
        }
    }
}

/// The save and restore binaries: names looked up in `PATH`, or paths.
#[derive(Debug, Args)]
pub struct BinaryFlags {
    /// The iptables-restore binary.
    #[arg(long, value_name = "PATH", env = ENV_IPTABLES_RESTORE, default_value = "iptables-restore")]
    pub iptables_restore: PathBuf,
    /// The iptables-save binary.
    #[arg(long, value_name = "PATH", env = ENV_IPTABLES_SAVE, default_value = "iptables-save")]
    pub iptables_save: PathBuf,
    /// The ip6tables-restore binary.
    #[arg(long, value_name = "PATH", env = ENV_IP6TABLES_RESTORE, default_value = "ip6tables-restore")]
    pub ip6tables_restore: PathBuf,
    /// The ip6tables-save binary.
    #[arg(long, value_name = "PATH", env = ENV_IP6TABLES_SAVE, default_value = "ip6tables-save")]
    pub ip6tables_save: PathBuf,
}

impl BinaryFlags {
    /// The binaries, with the flag and variable that set each (for error messages).
    pub fn tools(&self) -> Tools {
        let tool = |path: &PathBuf, flag, env| Tool {
            path: path.clone(),
            flag,
            env,
        };
        Tools {
            v4: FamilyTools {
                save: tool(&self.iptables_save, "--iptables-save", ENV_IPTABLES_SAVE),
                restore: tool(
                    &self.iptables_restore,
                    "--iptables-restore",
                    ENV_IPTABLES_RESTORE,
                ),
            },
            v6: FamilyTools {
                save: tool(&self.ip6tables_save, "--ip6tables-save", ENV_IP6TABLES_SAVE),
                restore: tool(
                    &self.ip6tables_restore,
                    "--ip6tables-restore",
                    ENV_IP6TABLES_RESTORE,
                ),
            },
        }
    }
}

// clap value parsers wrapping the contract's, so that what the injector accepts we accept.

fn mode(s: &str) -> Result<InterceptionMode, ListError> {
    s.parse()
}

fn port(s: &str) -> Result<u16, ListError> {
    match parse_ports(s)?.as_slice() {
        [p] => Ok(*p),
        _ => Err(ListError(format!("{s:?} is not a port (1-65535)"))),
    }
}

fn ports(s: &str) -> Result<Ports, ListError> {
    parse_ports(s)
}

fn cidrs(s: &str) -> Result<Cidrs, ListError> {
    parse_cidrs(s)
}

fn interfaces(s: &str) -> Result<Interfaces, ListError> {
    parse_interfaces(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(flags: &[String]) -> Result<InitArgs, clap::Error> {
        let argv = ["weft-redirector", "init"]
            .into_iter()
            .map(str::to_owned)
            .chain(flags.iter().cloned());
        match Cli::try_parse_from(argv)?.command {
            Command::Init(init) => Ok(init.redirect.to_init_args()),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn no_flags_means_the_contract_defaults() {
        assert_eq!(parse(&[]).expect("parse"), InitArgs::default());
        assert_eq!(
            parse(&InitArgs::default().to_args()).expect("parse"),
            InitArgs::default()
        );
    }

    #[test]
    fn injector_flags_round_trip() {
        let cases = [
            InitArgs {
                mode: InterceptionMode::Ebpf,
                proxy_uid: 2000,
                proxy_gid: 3000,
                outbound_port: 16001,
                inbound_port: 16006,
                include_outbound_cidrs: CidrSet::Some(vec![
                    "10.96.0.0/12".parse().expect("cidr"),
                    "fd00:10::/64".parse().expect("cidr"),
                ]),
                exclude_outbound_cidrs: vec![
                    "10.96.0.1/32".parse().expect("cidr"),
                    "fd00::1/128".parse().expect("cidr"),
                ],
                include_inbound_ports: PortSet::Some(vec![80, 8080]),
                exclude_inbound_ports: vec![15020, 15021, 15090, 22],
                include_outbound_ports: vec![3306],
                exclude_outbound_ports: vec![5432, 6379],
                exclude_interfaces: vec!["eth1".into(), "net1".into()],
            },
            InitArgs {
                mode: InterceptionMode::None,
                include_outbound_cidrs: CidrSet::None,
                include_inbound_ports: PortSet::None,
                exclude_inbound_ports: Vec::new(),
                ..InitArgs::default()
            },
            InitArgs {
                include_inbound_ports: PortSet::All,
                exclude_interfaces: vec!["veth@1".into()],
                ..InitArgs::default()
            },
        ];
        for args in cases {
            let flags = args.to_args();
            assert_eq!(parse(&flags).expect("parse"), args, "{flags:?}");
        }
    }

    #[test]
    fn bad_values_name_the_flag_and_value() {
        for (flag, needle) in [
            ("--exclude-outbound-cidrs=10.0.0.0/33", "10.0.0.0/33"),
            ("--include-outbound-cidrs=nope", "nope"),
            ("--outbound-port=0", "\"0\""),
            ("--inbound-port=65536", "65536"),
            ("--outbound-port=80,81", "80,81"),
            ("--exclude-inbound-ports=80,99999", "99999"),
            ("--include-inbound-ports=http", "http"),
            ("--mode=tproxy", "tproxy"),
            ("--exclude-interfaces=eth0;rm", "eth0;rm"),
            ("--proxy-uid=-1", "-1"),
        ] {
            let e = parse(&[flag.to_owned()]).expect_err(flag);
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{flag}");
            let msg = e.to_string();
            let name = flag.split('=').next().expect("flag name");
            assert!(msg.contains(name), "{flag}: {msg}");
            assert!(msg.contains(needle), "{flag}: {msg}");
        }
    }

    #[test]
    fn node_flags() {
        let cli = Cli::try_parse_from([
            "weft-redirector",
            "node",
            "--pods-dir=/run/pods",
            "--cgroup-root=/sys/fs/cgroup/unified/weft/n1",
            "--instance=n1",
            "--listen=127.0.0.1:0",
        ])
        .expect("parse");
        let Command::Node(n) = cli.command else {
            panic!("not node")
        };
        assert_eq!(n.layout().root, PathBuf::from("/sys/fs/bpf/weft/n1"));
        assert_eq!(n.pods_dir, Some(PathBuf::from("/run/pods")));
        assert!(!n.check && !n.uninstall);
        let both =
            Cli::try_parse_from(["weft-redirector", "node", "--pods-dir=/x", "--node-name=n"]);
        assert!(both.is_err(), "one pod source at a time");
    }

    #[test]
    fn binaries_default_to_path_lookup() {
        let cli = Cli::try_parse_from(["weft-redirector", "cleanup", "--iptables-save=/x/save"])
            .expect("parse");
        let Command::Cleanup(c) = cli.command else {
            panic!("not cleanup")
        };
        let tools = c.binaries.tools();
        assert_eq!(tools.v4.save.path, PathBuf::from("/x/save"));
        assert_eq!(tools.v4.restore.flag, "--iptables-restore");
        // Unless the environment says otherwise (the test runner does not set these).
        if std::env::var_os(ENV_IP6TABLES_RESTORE).is_none() {
            assert_eq!(tools.v6.restore.path, PathBuf::from("ip6tables-restore"));
        }
    }
}
