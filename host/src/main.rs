//! The `tensorlet` binary: the node daemon (`tensorlet serve`) and its CLI clients.

fn main() -> std::process::ExitCode {
    tensorlet::cli::main()
}
