//! `hangar-exec-wrapper`: the drone's exec wrapper as a program of its own, for processes that
//! embed a drone without calling `exec_wrapper::init` in their `main` (the drone's tests).
//! The `hangar` binary is its own wrapper and does not need this one.

fn main() -> std::process::ExitCode {
    hangar_drone::exec_wrapper::init();
    eprintln!(
        "usage: hangar-exec-wrapper {} <drone pid> <program> <argv0> [args...]",
        hangar_drone::exec_wrapper::MODE_ARG
    );
    std::process::ExitCode::from(2)
}
