use std::process::ExitCode;

fn main() -> ExitCode {
    // Joins an `mpirun` job before any thread starts; finalises MPI when dropped.
    let _launch = match mmkd::runtime::world::init() {
        Ok(launch) => launch,
        Err(err) => {
            eprintln!("{}", mmkd::cli::error_line(&err));
            return ExitCode::FAILURE;
        }
    };
    let result = mmkd::cli::run();
    let world = mmkd::runtime::world::world();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if world.size() > 1 => {
            // The other ranks would wait for this one forever: stop the job.
            eprintln!("{}: {}", world.describe_rank(), mmkd::cli::error_line(&err));
            world.abort(1)
        }
        Err(err) => {
            eprintln!("{}", mmkd::cli::error_line(&err));
            ExitCode::FAILURE
        }
    }
}
