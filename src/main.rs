use std::process::ExitCode;

fn main() -> ExitCode {
    match mmkd::cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{}", mmkd::cli::error_line(&err));
            ExitCode::FAILURE
        }
    }
}
