//! Opaque byte streams: copied both ways until both sides close, each side's end of stream
//! passed on as a half-close (`shutdown(SHUT_WR)`, or TLS close_notify then FIN).

use tokio::io::{AsyncRead, AsyncWrite};

use crate::metrics::{Direction, DirectionLabels, Metrics};

/// Copies `client` ↔ `upstream` until both directions end, then counts the bytes.
pub async fn splice<A, B>(metrics: &Metrics, direction: Direction, client: &mut A, upstream: &mut B)
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    match tokio::io::copy_bidirectional_with_sizes(client, upstream, 16 * 1024, 16 * 1024).await {
        Ok((received, sent)) => {
            let labels = DirectionLabels { direction };
            metrics
                .tcp_received_bytes
                .get_or_create(&labels)
                .inc_by(received);
            metrics.tcp_sent_bytes.get_or_create(&labels).inc_by(sent);
        }
        Err(error) => tracing::debug!(%error, "tcp stream ended with error"),
    }
}
