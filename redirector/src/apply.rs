//! Applying rules to the current network namespace with `iptables-save` and
//! `iptables-restore --noflush` (and their `ip6tables` twins): one restore, so one
//! transaction, per family.

use std::fmt;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ipnet::IpNet;
use tracing::{debug, info};
use weft_api::redirect::{CidrSet, InitArgs};

use crate::iptables::{self, Family};
use crate::loopback::{self, LoopbackError};
use crate::state::NatState;

/// Environment variable naming the `iptables-restore` binary.
pub const ENV_IPTABLES_RESTORE: &str = "WEFT_IPTABLES_RESTORE";
/// Environment variable naming the `iptables-save` binary.
pub const ENV_IPTABLES_SAVE: &str = "WEFT_IPTABLES_SAVE";
/// Environment variable naming the `ip6tables-restore` binary.
pub const ENV_IP6TABLES_RESTORE: &str = "WEFT_IP6TABLES_RESTORE";
/// Environment variable naming the `ip6tables-save` binary.
pub const ENV_IP6TABLES_SAVE: &str = "WEFT_IP6TABLES_SAVE";

/// Where the kernel says whether IPv6 is disabled in the current network namespace.
const DISABLE_IPV6: &str = "/proc/sys/net/ipv6/conf/all/disable_ipv6";
const NO_IPV6: &str = "the kernel has no ipv6 (/proc/sys/net/ipv6 is missing)";

/// Errors of applying or removing rules.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A binary is not installed.
    #[error(
        "{binary} not found: install the Debian package `iptables` (apt-get install iptables), \
         or give its path with {flag} or {env}"
    )]
    MissingBinary {
        /// The binary as configured.
        binary: String,
        /// The flag that overrides it.
        flag: &'static str,
        /// The environment variable that overrides it.
        env: &'static str,
    },
    /// A binary could not be started.
    #[error("cannot run {binary}")]
    Spawn {
        /// The binary.
        binary: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A binary ran and failed.
    #[error("{binary} failed ({status}): {stderr}{line}")]
    Failed {
        /// The binary.
        binary: String,
        /// Its exit status.
        status: String,
        /// What it said.
        stderr: String,
        /// The input line it complained about, if it named one.
        line: FailedLine,
    },
    /// The IPv6 inbound passthrough source could not be added to `lo`.
    #[error("cannot add the ipv6 passthrough source ::6/128 to lo")]
    Passthrough(#[from] LoopbackError),
    /// IPv6 ranges were asked for, and IPv6 cannot be programmed here.
    #[error(
        "ipv6 ranges were requested (--include-outbound-cidrs={cidrs}) but ipv6 rules cannot be installed: {reason}"
    )]
    Ipv6Required {
        /// The IPv6 ranges asked for.
        cidrs: String,
        /// Why IPv6 cannot be programmed.
        reason: String,
    },
}

/// The restore input line a failing restore named, shown after its message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailedLine(Option<String>);

impl fmt::Display for FailedLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(line) => write!(f, " (input: {line})"),
            None => Ok(()),
        }
    }
}

/// A binary, with the flag and environment variable that override it (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tool {
    /// A path, or a name looked up in `PATH`.
    pub path: PathBuf,
    /// The command-line flag that sets it.
    pub flag: &'static str,
    /// The environment variable that sets it.
    pub env: &'static str,
}

impl Tool {
    fn name(&self) -> String {
        self.path.display().to_string()
    }

    fn missing(&self) -> ApplyError {
        ApplyError::MissingBinary {
            binary: self.name(),
            flag: self.flag,
            env: self.env,
        }
    }

    /// Whether the binary can be found, before anything is changed.
    fn exists(&self) -> bool {
        if self.path.components().count() > 1 || self.path.is_absolute() {
            return self.path.is_file();
        }
        std::env::var_os("PATH").is_some_and(|paths| {
            std::env::split_paths(&paths).any(|dir| dir.join(&self.path).is_file())
        })
    }

    /// Runs the binary with `args` and `stdin`; returns its standard output.
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, ApplyError> {
        debug!(binary = %self.name(), ?args, "running");
        let mut child = Command::new(&self.path)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => self.missing(),
                _ => ApplyError::Spawn {
                    binary: self.name(),
                    source,
                },
            })?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A restore that exits early closes its end; its status and stderr then say why.
            let _ = pipe.write_all(input.as_bytes());
        }
        let out = child
            .wait_with_output()
            .map_err(|source| ApplyError::Spawn {
                binary: self.name(),
                source,
            })?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        Err(ApplyError::Failed {
            binary: self.name(),
            status: out.status.to_string(),
            line: FailedLine(stdin.and_then(|input| failed_line(&stderr, input))),
            stderr,
        })
    }
}

/// The input line named by a restore error such as `iptables-restore: line 7 failed`.
fn failed_line(stderr: &str, input: &str) -> Option<String> {
    let (_, after) = stderr.split_once("line ")?;
    let number: usize = after
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    input.lines().nth(number.checked_sub(1)?).map(str::to_owned)
}

/// The save and restore binaries of one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyTools {
    /// `iptables-save` or `ip6tables-save`.
    pub save: Tool,
    /// `iptables-restore` or `ip6tables-restore`.
    pub restore: Tool,
}

impl FamilyTools {
    fn exists(&self) -> Result<(), ApplyError> {
        for tool in [&self.save, &self.restore] {
            if !tool.exists() {
                return Err(tool.missing());
            }
        }
        Ok(())
    }

    fn nat_state(&self) -> Result<NatState, ApplyError> {
        self.save
            .run(&["-t", "nat"], None)
            .map(|s| NatState::parse(&s))
    }

    fn restore(&self, input: &str) -> Result<(), ApplyError> {
        // --wait: legacy iptables takes a host-wide lock that another pod's init may hold.
        self.restore
            .run(&["--noflush", "--wait"], Some(input))
            .map(drop)
    }
}

/// The binaries of both families.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    /// `iptables-save`, `iptables-restore`.
    pub v4: FamilyTools,
    /// `ip6tables-save`, `ip6tables-restore`.
    pub v6: FamilyTools,
}

impl Tools {
    /// The binaries of `family`.
    pub fn family(&self, family: Family) -> &FamilyTools {
        match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }
}

/// Installs the rules for `args` in the current network namespace (whatever `args.mode`
/// says: the caller decides), replacing any earlier Weft rules, one restore per family.
///
/// With IPv6, `::6/128` is added to `lo` (the proxy's inbound passthrough source, as
/// `127.0.0.6` is for IPv4); cleanup leaves it, as Istio does.
///
/// IPv6 is skipped, with an info log, when the namespace has it disabled or `ip6tables` is
/// not installed, unless IPv6 ranges were asked for in `--include-outbound-cidrs`.
pub fn init(args: &InitArgs, tools: &Tools) -> Result<(), ApplyError> {
    tools.v4.exists()?;
    let v4 = tools.v4.nat_state()?;

    // Decide about IPv6 before changing anything, so that an error leaves the namespace as it was.
    let v6 = match ipv6_unavailable(&tools.v6) {
        None => Some(tools.v6.nat_state()?),
        Some(reason) => match requested_v6(args) {
            Some(cidrs) => return Err(ApplyError::Ipv6Required { cidrs, reason }),
            None => {
                info!(%reason, "ipv6 rules skipped");
                None
            }
        },
    };

    for (family, state) in [(Family::V4, Some(v4)), (Family::V6, v6)] {
        let Some(state) = state else { continue };
        if family == Family::V6 {
            loopback::add_passthrough_v6()?;
        }
        let rules = iptables::rules(args, family);
        let input = iptables::render(&rules, &state.delete_jumps());
        tools.family(family).restore(&input)?;
        info!(%family, rules = rules.len(), replaced = !state.is_clean(), "rules installed");
    }
    Ok(())
}

/// Removes Weft's chains and the jumps to them from both families, and nothing else.
/// Succeeds when there is nothing to remove; skips IPv6 when `ip6tables` is not installed.
pub fn cleanup(tools: &Tools) -> Result<(), ApplyError> {
    for family in Family::ALL {
        let bins = tools.family(family);
        if family == Family::V6 {
            // Rules may remain where ipv6 is merely disabled; without the kernel's ipv6 there
            // can be none, and ip6tables-save would fail.
            let skip = match bins.exists() {
                Err(missing) => Some(missing.to_string()),
                Ok(()) if !Path::new(DISABLE_IPV6).exists() => Some(NO_IPV6.to_owned()),
                Ok(()) => None,
            };
            if let Some(reason) = skip {
                info!(%reason, "ipv6 cleanup skipped");
                continue;
            }
        }
        bins.exists()?;
        match bins.nat_state()?.cleanup() {
            None => info!(%family, "nothing to remove"),
            Some(input) => {
                bins.restore(&input)?;
                info!(%family, "rules removed");
            }
        }
    }
    Ok(())
}

/// Why IPv6 rules cannot be installed here, if they cannot.
fn ipv6_unavailable(v6: &FamilyTools) -> Option<String> {
    match std::fs::read_to_string(DISABLE_IPV6) {
        Err(_) => return Some(NO_IPV6.to_owned()),
        Ok(v) if v.trim() != "0" => {
            return Some(format!(
                "ipv6 is disabled in this network namespace ({DISABLE_IPV6} = {})",
                v.trim()
            ));
        }
        Ok(_) => {}
    }
    v6.exists().err().map(|e| e.to_string())
}

/// The IPv6 ranges `args` explicitly asks to capture, comma-separated, if any.
fn requested_v6(args: &InitArgs) -> Option<String> {
    let CidrSet::Some(nets) = &args.include_outbound_cidrs else {
        return None;
    };
    let v6: Vec<String> = nets
        .iter()
        .filter(|n| matches!(n, IpNet::V6(_)))
        .map(IpNet::to_string)
        .collect();
    (!v6.is_empty()).then(|| v6.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_line_is_quoted_from_input() {
        let input = "*nat\n:WEFT_OUTPUT - [0:0]\n-A WEFT_OUTPUT -j BOGUS\nCOMMIT\n";
        assert_eq!(
            failed_line("iptables-restore v1.8.9 (nf_tables): line 3 failed", input).as_deref(),
            Some("-A WEFT_OUTPUT -j BOGUS")
        );
        assert_eq!(failed_line("iptables-restore: line 0 failed", input), None);
        assert_eq!(failed_line("no such thing", input), None);
    }

    #[test]
    fn only_included_v6_ranges_require_v6() {
        let mut args = InitArgs {
            exclude_outbound_cidrs: vec!["fd00::/8".parse().expect("cidr")],
            ..InitArgs::default()
        };
        assert_eq!(requested_v6(&args), None);
        args.include_outbound_cidrs = CidrSet::Some(vec![
            "10.0.0.0/8".parse().expect("cidr"),
            "fd00::/8".parse().expect("cidr"),
        ]);
        assert_eq!(requested_v6(&args).as_deref(), Some("fd00::/8"));
    }

    #[test]
    fn missing_binary_names_it_and_the_package() {
        let tool = Tool {
            path: "/nonexistent/iptables-restore".into(),
            flag: "--iptables-restore",
            env: ENV_IPTABLES_RESTORE,
        };
        assert!(!tool.exists());
        let e = tool.run(&[], None).expect_err("missing");
        let msg = e.to_string();
        assert!(
            msg.starts_with("/nonexistent/iptables-restore not found"),
            "{msg}"
        );
        assert!(msg.contains("Debian package `iptables`"), "{msg}");
        assert!(msg.contains("--iptables-restore"), "{msg}");
    }

    #[test]
    fn binaries_are_found_in_path() {
        let tool = |path: &str| Tool {
            path: path.into(),
            flag: "--x",
            env: "X",
        };
        assert!(tool("sh").exists());
        assert!(tool("/bin/sh").exists());
        assert!(!tool("weft-no-such-binary").exists());
    }
}
