//! `weft-webhook`: Weft's control plane (`serve`) and its offline tools (`inject`, `validate`).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use weft_api::validate::{Severity, validate_documents};
use weft_webhook::mesh::MeshConfig;
use weft_webhook::serve::{ServeOptions, run};
use weft_webhook::{manifest, registration};

#[derive(Debug, Parser)]
#[command(
    name = "weft-webhook",
    version,
    about = "Weft's control plane: sidecar injection, validation, CA and config distribution"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane: the HTTPS admission webhook (`/inject`, `/validate`, `/healthz`),
    /// the mesh CA and config distribution (`--control-plane-listen`).
    Serve(Box<ServeArgs>),
    /// Inject the sidecar into the workloads of a YAML file, like `istioctl kube-inject`.
    Inject(InjectArgs),
    /// Validate Istio, Gateway API and SMI resources in a YAML file; exit 1 on errors.
    Validate(ValidateArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "WEFT_LISTEN", default_value = "0.0.0.0:443")]
    listen: SocketAddr,
    /// Mesh config file (YAML); built-in defaults when absent.
    #[arg(long, env = "WEFT_MESH_CONFIG")]
    mesh_config: Option<PathBuf>,
    /// Serving certificate chain (PEM). Without it a certificate is made at start.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA to publish as caBundle with --tls-cert (default: the chain's last certificate).
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Service the API server calls (names in the generated certificate).
    #[arg(long, default_value = "weft-control-plane")]
    service: String,
    /// Namespace of the control plane.
    #[arg(long, env = "POD_NAMESPACE", default_value = "weft-system")]
    namespace: String,
    /// Keep the generated serving certificate in this Secret, so replicas and restarts share it.
    #[arg(long)]
    serving_cert_secret: Option<String>,
    /// Keep the caBundle of the Mutating- and ValidatingWebhookConfiguration of this name.
    #[arg(long)]
    patch_webhook_ca: Option<String>,
    /// Write the CA that clients must trust to this file.
    #[arg(long)]
    ca_out: Option<PathBuf>,
    /// Talk to a cluster even outside a pod (`true`) or never (`false`).
    #[arg(long)]
    kubernetes: Option<bool>,
    /// Local mode: read pods, services and config from this directory of YAML (watched).
    #[arg(long, env = "WEFT_LOCAL_DIR")]
    local_dir: Option<PathBuf>,
    /// Keep the mesh CA in this directory (made on first start; Istio's cacerts file names).
    #[arg(long, env = "WEFT_CA_DIR")]
    ca_dir: Option<PathBuf>,
    /// Local mode: PEM public key (EC P-256) that verifies the proxies' ES256 tokens.
    #[arg(long, env = "WEFT_TOKEN_PUBLIC_KEY")]
    token_public_key: Option<PathBuf>,
    /// Address of the CA and discovery port.
    #[arg(
        long,
        env = "WEFT_CONTROL_PLANE_LISTEN",
        default_value = "0.0.0.0:15012"
    )]
    control_plane_listen: SocketAddr,
    /// IP address in the control plane's serving certificate (repeatable).
    #[arg(long = "serving-ip")]
    serving_ips: Vec<std::net::IpAddr>,
    /// Trust domain of workload identities (default: the mesh config's).
    #[arg(long, env = "WEFT_TRUST_DOMAIN")]
    trust_domain: Option<String>,
    /// Namespace of mesh-wide policies (PeerAuthentication, Sidecar).
    #[arg(long, default_value = weft_webhook::resources::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// Another trusted root, sent to proxies with the mesh root (root rotation): a PEM file,
    /// or a directory whose `*.pem` / `*.crt` files are each one. Repeatable. Re-read while
    /// running (every second, or with the CA Secret every 30 s): a root added or removed
    /// reaches the proxies without a restart.
    #[arg(long = "extra-root", value_name = "FILE|DIR")]
    extra_roots: Vec<PathBuf>,
    /// Longest workload certificate the CA issues (`24h`, `7d`).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "7d")]
    max_cert_ttl: std::time::Duration,
}

#[derive(Debug, Args)]
struct InjectArgs {
    /// Input YAML (`-` for stdin).
    #[arg(short = 'f', long = "filename")]
    file: PathBuf,
    /// Mesh config file (YAML); built-in defaults when absent.
    #[arg(long)]
    mesh_config: Option<PathBuf>,
    /// Output file (default stdout).
    #[arg(short = 'o', long = "output")]
    output: Option<PathBuf>,
    /// Ask this cluster (kubeconfig) whether native sidecars are supported, for
    /// `nativeSidecar: auto`; without it `auto` means native.
    #[arg(long)]
    kubernetes: bool,
}

#[derive(Debug, Args)]
struct ValidateArgs {
    /// Input YAML (`-` for stdin).
    #[arg(short = 'f', long = "filename")]
    file: PathBuf,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn read_input(path: &Path) -> Result<String> {
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read stdin")?;
        Ok(s)
    } else {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
    }
}

fn load_mesh(path: Option<&Path>) -> Result<MeshConfig> {
    match path {
        Some(p) => Ok(MeshConfig::load(p)?),
        None => Ok(MeshConfig::default()),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn serve(args: ServeArgs) -> Result<ExitCode> {
    let opts = ServeOptions {
        listen: args.listen,
        mesh_config: args.mesh_config,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        tls_ca: args.tls_ca,
        service: args.service,
        namespace: args.namespace,
        serving_cert_secret: args.serving_cert_secret,
        patch_webhook_ca: args.patch_webhook_ca,
        ca_out: args.ca_out,
        kubernetes: args.kubernetes,
        local_dir: args.local_dir,
        ca_dir: args.ca_dir,
        token_public_key: args.token_public_key,
        control_plane_listen: args.control_plane_listen,
        serving_ips: args.serving_ips,
        trust_domain: args.trust_domain,
        root_namespace: args.root_namespace,
        extra_roots: args.extra_roots,
        max_cert_ttl: args.max_cert_ttl,
    };
    runtime()?.block_on(run(opts, shutdown_signal()))?;
    Ok(ExitCode::SUCCESS)
}

fn inject(args: InjectArgs) -> Result<ExitCode> {
    let mesh = load_mesh(args.mesh_config.as_deref())?;
    let input = read_input(&args.file)?;
    let native = if args.kubernetes {
        let supported = runtime()?.block_on(async {
            let client = kube::Client::try_default().await?;
            anyhow::Ok(registration::supports_native_sidecars(&client).await?)
        })?;
        Some(supported)
    } else {
        None
    };
    let out = manifest::inject_yaml(&input, &mesh, native)?;
    for w in &out.warnings {
        eprintln!("warning: {w}");
    }
    let yaml = out.to_yaml()?;
    match &args.output {
        Some(path) => std::fs::write(path, yaml)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => std::io::stdout()
            .write_all(yaml.as_bytes())
            .context("cannot write stdout")?,
    }
    Ok(ExitCode::SUCCESS)
}

fn validate(args: ValidateArgs) -> Result<ExitCode> {
    let input = read_input(&args.file)?;
    let findings = validate_documents(&input);
    let mut errors = 0;
    for f in &findings {
        let severity = match f.severity {
            Severity::Error => {
                errors += 1;
                "error"
            }
            Severity::Warning => "warning",
        };
        println!("{severity}: {}: {}: {}", f.object, f.field, f.message);
    }
    eprintln!(
        "{}: {errors} errors, {} warnings",
        args.file.display(),
        findings.len() - errors
    );
    Ok(if errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(a) => serve(*a),
        Command::Inject(a) => inject(a),
        Command::Validate(a) => validate(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
