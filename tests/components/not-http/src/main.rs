//! Test fixture: a component of the `wasi:cli/command` world. It is valid WebAssembly but
//! exports no `wasi:http/incoming-handler`, so a node must refuse to deploy it.

fn main() {
    println!("I am a command, not an HTTP app");
}
