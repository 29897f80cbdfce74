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
    /// Run the control plane: the HTTPS admission webhook (`/inject`, `/validate`, `/healthz`).
    Serve(ServeArgs),
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
        Command::Serve(a) => serve(a),
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
