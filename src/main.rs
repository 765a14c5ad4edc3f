//! cairn's entry point: parse, set up logging, run, map errors to exit codes.

use cairn::error::exit;
use cairn::redact::{RedactingWriter, redact};
use clap::Parser;

/// jemalloc: glibc's allocator raises its mmap threshold after the first multi-MiB
/// part is freed and then keeps freed parts in per-thread arenas, which doubled the
/// peak RSS of a backup (measured in docs/benchmarks.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    cairn::failpoint::setup();
    let args: Vec<String> = std::env::args().collect();
    if let Some(help) = cairn::cli::plan::start_help(&args) {
        cairn::out!("{help}");
        std::process::exit(exit::OK);
    }
    let cli = cairn::cli::Cli::parse();
    let default = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    // The cloud SDKs' own warnings (every credential provider they tried, every
    // retry) repeat what cairn's one error line says; -vv shows them.
    let quiet_sdks = if cli.verbose >= 2 {
        String::new()
    } else {
        ",aws_config=error,aws_smithy_runtime=error,aws_smithy_runtime_api=error,azure_core=error"
            .to_string()
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default}{quiet_sdks}")));
    // Colours only on a terminal, and never with NO_COLOR set (no-color.org).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| RedactingWriter(std::io::stderr()))
        .with_target(false)
        .with_ansi(colour)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            cairn::say!("cairn: cannot start the async runtime: {e}");
            std::process::exit(exit::FAILED);
        }
    };
    let code = match runtime.block_on(cairn::cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            cairn::say!("cairn: {}", redact(&e.to_string()));
            e.exit_code()
        }
    };
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    std::process::exit(code);
}
