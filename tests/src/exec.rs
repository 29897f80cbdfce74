//! The contract between the local node and `weft-pod-exec`, the launcher that puts a
//! container process into its pod (network namespace, mount namespace with the pod's hosts
//! file and volumes, cgroup, user) and then becomes it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything `weft-pod-exec` needs to start one container process.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExecSpec {
    /// Network namespace to join (`/var/run/netns/<name>`).
    pub netns: PathBuf,
    /// Bound over `/etc/hosts`.
    pub hosts_file: Option<PathBuf>,
    /// Directories that get a fresh tmpfs in the container's mount namespace (so that mount
    /// points under them can be created without touching the host's tree).
    pub private_dirs: Vec<PathBuf>,
    /// Bind mounts, in order.
    pub mounts: Vec<BindMount>,
    /// cgroup v2 directory to join.
    pub cgroup: Option<PathBuf>,
    /// Stay in the host's mount namespace (its `/sys` with the cgroup2 and bpffs mounts, and
    /// network namespace files created later): for node agents, not containers. Hosts file,
    /// private dirs and mounts are then not applied.
    #[serde(default)]
    pub host_mounts: bool,
    /// User.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Working directory.
    pub workdir: Option<PathBuf>,
    /// Program (absolute path) and arguments; `argv[0]` is the program.
    pub argv: Vec<String>,
    /// The whole environment.
    pub env: Vec<(String, String)>,
}

/// One bind mount.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BindMount {
    /// Host path.
    pub source: PathBuf,
    /// Path inside the container.
    pub target: PathBuf,
    /// Mount read-only.
    pub read_only: bool,
}

/// Environment variable carrying the JSON spec.
pub const SPEC_ENV: &str = "WEFT_POD_EXEC_SPEC";
