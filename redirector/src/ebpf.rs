//! eBPF interception (`init --mode=ebpf`): the node agent's programs redirect the pod, and the
//! init step only verifies that the agent has taken it. Not in this build yet.

use weft_api::redirect::InitArgs;

/// Errors of the eBPF mode check.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// This build cannot verify eBPF interception.
    #[error(
        "eBPF mode is verified by the node agent; not available in this build \
         (use --mode=redirect)"
    )]
    NotAvailable,
}

/// Checks that the node agent's eBPF programs have taken the current pod.
pub fn verify(_args: &InitArgs) -> Result<(), EbpfError> {
    Err(EbpfError::NotAvailable)
}
