//! `weft-proxy`: run the sidecar, or wait for it to be ready (the classic-mode postStart hook).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use weft_proxy::config::Settings;

#[derive(Parser, Debug)]
#[command(name = "weft-proxy", version, about = "Weft's sidecar proxy")]
struct Cli {
    /// Static config (the weft-api config model, YAML or JSON), reloaded when it changes.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Wait until the proxy beside this process reports ready (postStart hook).
    Wait {
        /// Give up after this long.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Readiness URL.
        #[arg(long, default_value = "http://127.0.0.1:15021/healthz/ready")]
        url: String,
    },
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var(weft_api::bootstrap::ENV_LOG_LEVEL)
        .ok()
        .filter(|v| !v.is_empty())
        .map(EnvFilter::new)
        .unwrap_or_else(|| {
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
        });
    let json = std::env::var(weft_api::bootstrap::ENV_LOG_FORMAT).is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Some(Command::Wait { timeout, url }) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(wait(&url, timeout))
        }
        None => {
            let settings = Settings::from_env(cli.config).context("invalid environment")?;
            let rt = if settings.concurrency == 1 {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(settings.concurrency)
                    .thread_name("weft-worker")
                    .enable_all()
                    .build()?
            };
            rt.block_on(weft_proxy::app::run(settings))
        }
    }
}

async fn wait(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let uri: http::Uri = url.parse().with_context(|| format!("--url {url:?}"))?;
    let host = uri.host().context("--url has no host")?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let started = Instant::now();
    loop {
        let last = match probe_once(&host, port, &uri).await {
            Ok(status) if status.is_success() => {
                tracing::info!(elapsed = ?started.elapsed(), "proxy is ready");
                return Ok(());
            }
            Ok(status) => format!("status {status}"),
            Err(e) => format!("{e:#}"),
        };
        if started.elapsed() >= timeout {
            bail!("proxy not ready after {timeout:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn probe_once(host: &str, port: u16, uri: &http::Uri) -> anyhow::Result<http::StatusCode> {
    let tcp = tokio::net::TcpStream::connect((host, port)).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = http::Request::get(uri.path())
        .header(http::header::HOST, format!("{host}:{port}"))
        .body(Empty::<bytes::Bytes>::new())?;
    Ok(sender.send_request(req).await?.status())
}
