//! Request bodies that can be sent more than once: for retries and mirrors.
//!
//! The first try streams the body as it arrives while a copy of up to `cap` bytes is kept;
//! a retry replays the copy and then continues with whatever the client has not sent yet.
//! A body larger than `cap` stops being kept and cannot be replayed: as in Envoy, such a
//! request is not retried (and not mirrored).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::http::{Body, BoxError};

/// Largest body kept for replay.
pub const DEFAULT_CAP: usize = 64 * 1024;

struct Shared {
    source: Option<Body>,
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    len: usize,
    cap: usize,
    eos: bool,
    overflow: bool,
    failed: bool,
}

/// A reader of a replayable body.
pub struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    pos: usize,
    trailers_sent: bool,
}

impl std::fmt::Debug for ReplayBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayBody")
            .field("pos", &self.pos)
            .finish()
    }
}

impl ReplayBody {
    /// Wraps `body`, keeping up to `cap` bytes.
    pub fn new(body: Body, cap: usize) -> ReplayBody {
        let eos = body.is_end_stream();
        ReplayBody {
            shared: Arc::new(Mutex::new(Shared {
                source: (!eos).then_some(body),
                chunks: Vec::new(),
                trailers: None,
                len: 0,
                cap,
                eos,
                overflow: false,
                failed: false,
            })),
            pos: 0,
            trailers_sent: false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new reader from the start, or `None` when the body outgrew the cap or failed.
    pub fn replay(&self) -> Option<ReplayBody> {
        let s = self.lock();
        (!s.overflow && !s.failed).then(|| ReplayBody {
            shared: self.shared.clone(),
            pos: 0,
            trailers_sent: false,
        })
    }

    /// The whole body once the client sent all of it and it fit the cap.
    pub fn complete(&self) -> Option<(Bytes, Option<HeaderMap>)> {
        let s = self.lock();
        if !s.eos || s.overflow || s.failed {
            return None;
        }
        let data = match s.chunks.len() {
            0 => Bytes::new(),
            1 => s.chunks[0].clone(),
            _ => {
                let mut b = BytesMut::with_capacity(s.len);
                for c in &s.chunks {
                    b.extend_from_slice(c);
                }
                b.freeze()
            }
        };
        Some((data, s.trailers.clone()))
    }

    /// True when the body outgrew the cap.
    pub fn overflowed(&self) -> bool {
        self.lock().overflow
    }
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut s = this.shared.lock().unwrap_or_else(|p| p.into_inner());
        if this.pos < s.chunks.len() {
            let c = s.chunks[this.pos].clone();
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(c))));
        }
        if s.eos {
            if !this.trailers_sent {
                this.trailers_sent = true;
                if let Some(t) = s.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        }
        let Some(src) = s.source.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(src).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.eos = true;
                s.source = None;
                this.trailers_sent = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                s.failed = true;
                s.source = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                // Clients stop polling once the body says it ended: note the end now.
                let ended = s.source.as_ref().is_some_and(HttpBody::is_end_stream);
                if let Some(data) = frame.data_ref() {
                    s.len += data.len();
                    if !s.overflow {
                        if s.len > s.cap {
                            s.overflow = true;
                            s.chunks = Vec::new();
                        } else {
                            s.chunks.push(data.clone());
                            this.pos = s.chunks.len();
                        }
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    s.trailers = Some(t.clone());
                    s.eos = true;
                    s.source = None;
                    this.trailers_sent = true;
                }
                if ended && !s.eos {
                    s.eos = true;
                    s.source = None;
                    this.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = self.lock();
        if self.pos < s.chunks.len() {
            return false;
        }
        if s.eos {
            return self.trailers_sent || s.trailers.is_none();
        }
        s.source.as_ref().is_some_and(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let s = self.lock();
        if s.eos && !s.overflow {
            let rest: usize = s.chunks.iter().skip(self.pos).map(Bytes::len).sum();
            SizeHint::with_exact(rest as u64)
        } else {
            SizeHint::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::boxed;
    use http_body_util::{BodyExt, Full, StreamBody};

    fn stream(chunks: &[&'static str], trailers: bool) -> Body {
        let mut frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        if trailers {
            let mut t = HeaderMap::new();
            t.insert("grpc-status", http::HeaderValue::from_static("0"));
            frames.push(Ok(Frame::trailers(t)));
        }
        boxed(StreamBody::new(futures_util::stream::iter(frames)))
    }

    #[tokio::test]
    async fn replays_after_a_partial_read_and_keeps_trailers() {
        let mut first = ReplayBody::new(stream(&["ab", "cd", "ef"], true), 1024);
        let f = first.frame().await.expect("frame").expect("ok");
        assert_eq!(f.into_data().expect("data"), "ab");
        // The first try failed after one chunk: a retry gets everything.
        let second = first.replay().expect("replayable");
        drop(first);
        let collected = second.collect().await.expect("body");
        assert_eq!(collected.trailers().expect("trailers")["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), "abcdef");
    }

    #[tokio::test]
    async fn complete_copy_for_mirrors() {
        let body = ReplayBody::new(stream(&["he", "llo"], false), 1024);
        assert!(body.complete().is_none(), "not read yet");
        let again = body.replay().expect("replayable");
        let _ = body.collect().await.expect("read");
        assert_eq!(again.complete().expect("complete").0, "hello");
        assert_eq!(again.collect().await.expect("replay").to_bytes(), "hello");
    }

    #[tokio::test]
    async fn over_the_cap_is_not_replayable() {
        let body = ReplayBody::new(stream(&["0123456789", "0123456789"], false), 15);
        let replay = body.replay().expect("before reading");
        let all = body.collect().await.expect("still streams").to_bytes();
        assert_eq!(all.len(), 20);
        assert!(replay.replay().is_none());
        assert!(replay.overflowed());
    }

    #[tokio::test]
    async fn empty_bodies_are_complete_at_once() {
        let body = ReplayBody::new(crate::http::empty(), 10);
        assert!(body.is_end_stream());
        assert_eq!(body.complete().expect("complete").0.len(), 0);
        let full = ReplayBody::new(boxed(Full::new(Bytes::from_static(b"x"))), 10);
        assert!(!full.is_end_stream());
    }
}
