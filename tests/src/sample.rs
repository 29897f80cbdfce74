//! The sample app's wire contract: what its servers answer and what its clients report, so
//! that tests read the reports of clients run inside pods.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What the HTTP server answers (JSON) to any request it echoes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EchoReply {
    /// The server's `--name` (the pod).
    pub server: String,
    /// Request method.
    pub method: String,
    /// Request path.
    pub path: String,
    /// Query string.
    pub query: String,
    /// `HTTP/1.1` or `HTTP/2.0` as the server received it.
    pub version: String,
    /// Host header or `:authority`.
    pub host: String,
    /// Request headers (lower-case names; repeated headers joined with `, `).
    pub headers: BTreeMap<String, String>,
    /// Length of the request body.
    pub body_len: usize,
}

impl EchoReply {
    /// The `x-forwarded-client-cert` header the server received.
    pub fn xfcc(&self) -> Option<&str> {
        self.headers
            .get("x-forwarded-client-cert")
            .map(String::as_str)
    }

    /// The `URI=` part of the client-certificate header: the caller's SPIFFE ID.
    pub fn caller(&self) -> Option<&str> {
        self.xfcc()?
            .split(';')
            .find_map(|kv| kv.strip_prefix("URI="))
    }
}

/// A request a server received (`GET /_requests`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenRequest {
    /// Path.
    pub path: String,
    /// Host or `:authority`.
    pub host: String,
}

/// Report of `weft-sample-app http`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HttpReport {
    /// Responses with a 2xx status.
    pub ok: u64,
    /// Responses by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no response, by error text.
    pub errors: BTreeMap<String, u64>,
    /// Replies parsed from JSON bodies (at most `--keep` of them).
    pub replies: Vec<EchoReply>,
    /// Count of replies per server name.
    pub servers: BTreeMap<String, u64>,
    /// The HTTP version of the responses, as the client saw it.
    pub versions: BTreeMap<String, u64>,
    /// Time of each request until its whole response, milliseconds, in completion order.
    pub latencies_ms: Vec<u64>,
    /// Response headers of the first response, lower-case names.
    pub first_headers: BTreeMap<String, String>,
}

impl HttpReport {
    /// Requests that failed or got a non-2xx status.
    pub fn failed(&self) -> u64 {
        self.errors.values().sum::<u64>()
            + self
                .statuses
                .iter()
                .filter(|(code, _)| !(200..300).contains(*code))
                .map(|(_, n)| n)
                .sum::<u64>()
    }
}

/// Report of `weft-sample-app grpc`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GrpcReport {
    /// The unary reply's message.
    pub unary_message: String,
    /// The server that answered the unary call.
    pub unary_server: String,
    /// The server that answered the stream.
    pub stream_server: String,
    /// The caller identity the server saw on the unary call.
    pub unary_caller: String,
    /// Replies received on the bidirectional stream, in order.
    pub stream_replies: Vec<String>,
    /// The trailer `x-weft-sample-trailer` of the unary call.
    pub trailer: String,
    /// A call that failed: its status code and message.
    pub error: Option<String>,
}

/// Report of `weft-sample-app ws`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WsReport {
    /// Messages echoed back correctly.
    pub echoed: u64,
    /// Messages sent.
    pub sent: u64,
    /// Failure, if any.
    pub error: Option<String>,
}

/// Report of `weft-sample-app tcp`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TcpReport {
    /// Greeting read before sending anything (server-first mode).
    pub greeting: Option<String>,
    /// Bytes sent.
    pub sent: u64,
    /// Bytes received back.
    pub received: u64,
    /// The echo equals what was sent, byte for byte.
    pub identical: bool,
    /// The server's end of stream arrived after our half-close (both directions closed cleanly).
    pub clean_close: bool,
    /// Failure, if any.
    pub error: Option<String>,
}

/// Report of `weft-sample-app load`: a fixed-rate run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadReport {
    /// Requests answered 2xx.
    pub ok: u64,
    /// Requests that failed or got another status.
    pub failed: u64,
    /// Failures by reason.
    pub failures: BTreeMap<String, u64>,
    /// Achieved rate.
    pub rps: f64,
    /// Latency percentiles, microseconds, measured from each request's scheduled start.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Maximum.
    pub max_us: u64,
}

/// gRPC messages of the sample `weft.sample.Echo` service.
pub mod grpc {
    /// Request.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct EchoRequest {
        /// Text to echo.
        #[prost(string, tag = "1")]
        pub message: String,
    }

    /// Reply.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct EchoResponse {
        /// The echoed text.
        #[prost(string, tag = "1")]
        pub message: String,
        /// Server name.
        #[prost(string, tag = "2")]
        pub server: String,
        /// Caller SPIFFE ID from `x-forwarded-client-cert`.
        #[prost(string, tag = "3")]
        pub caller: String,
    }

    /// Unary method path.
    pub const UNARY: &str = "/weft.sample.Echo/Unary";
    /// Bidirectional streaming method path.
    pub const CHAT: &str = "/weft.sample.Echo/Chat";
}
