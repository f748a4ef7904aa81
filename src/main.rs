//! `gatehouse`: parse the command line, run it, exit with its code.

/// jemalloc instead of glibc's malloc: a proxied request allocates and frees a few dozen
/// small blocks (header maps, buffers, futures), and glibc's free-list work took about
/// 5 % of the gateway's CPU at 64 connections (perf). See benches/README.md.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    gatehouse::cli::run()
}
