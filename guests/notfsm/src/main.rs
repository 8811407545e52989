//! A WASI command with none of the `state-machine` exports: the host must refuse to load
//! it as a state machine, with an error that says so.

fn main() {
    println!("notfsm: a plain WASI command, not a wasm-raft state machine");
}
