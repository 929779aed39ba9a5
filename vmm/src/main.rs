//! The `ligera` command.

use clap::Parser;
use vmm::cli::{Cli, Command};
use vmm::exit::{EXIT_OK, EXIT_USAGE, EXIT_VMM_ERROR};
use vmm::{builder, logger, terminal};

fn main() {
    // Whatever happens, the terminal gets its settings back.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        terminal::restore();
        default_hook(info);
    }));
    std::process::exit(run());
}

fn run() -> i32 {
    if vmm::firecracker::invoked_as_firecracker() {
        use clap::Parser as _;
        return match vmm::firecracker::FirecrackerArgs::try_parse() {
            Ok(args) => {
                logger::init(log::LevelFilter::Warn);
                vmm::firecracker::main(args)
            }
            Err(e) => usage_error(e),
        };
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    logger::init(cli.log_level);
    match cli.command {
        Command::Run(args) => run_vm(args),
        Command::Image(cmd) => image_command(cmd),
        Command::Bench(args) => vmm::bench::bench(args),
        Command::Firecracker(args) => vmm::firecracker::main(args),
        Command::Snapshot(vmm::cli::SnapshotCommand::Create(args)) => {
            vmm::snapshot::cli::create(args)
        }
        Command::Snapshot(vmm::cli::SnapshotCommand::Restore(args)) => {
            match vmm::snapshot::cli::restore_config(args) {
                Ok((config, jail)) => start_vm(config, jail),
                Err(code) => code,
            }
        }
        Command::Sandbox(sandbox) => {
            use vmm::sandbox::{SandboxCommand, persistent, run};
            match sandbox {
                SandboxCommand::Run(args) => run(args),
                SandboxCommand::Create(args) => persistent::create(args),
                SandboxCommand::Exec(args) => persistent::exec(args),
                SandboxCommand::Cp(args) => persistent::cp(args),
                SandboxCommand::Ls => persistent::ls(),
                SandboxCommand::Rm(args) => persistent::rm(args),
                SandboxCommand::Serve(args) => persistent::serve(args),
            }
        }
    }
}

/// `ligera run`.
fn run_vm(args: vmm::cli::RunArgs) -> i32 {
    let (config, jail) = args.into_config();
    start_vm(config, jail)
}

/// Builds (or restores) the VM of `config`, in its jail, and runs it.
fn start_vm(mut config: vmm::config::VmConfig, jail: vmm::jail::JailOptions) -> i32 {
    use vmm::jail::{JailError, Start};
    if let Err(e) = config.validate() {
        eprintln!("ligera: error: {e} (see 'ligera run --help')");
        return EXIT_USAGE;
    }
    let (jailed, foundation) =
        match vmm::jail::start(&jail, &mut config, EXIT_VMM_ERROR, builder::lay_foundation) {
            Ok(Start::Supervisor(code)) => return code,
            Ok(Start::Vm(jailed, foundation)) => (jailed, foundation),
            Err(JailError::Options(e)) => {
                eprintln!("ligera: error: {e} (see 'ligera run --help')");
                return EXIT_USAGE;
            }
            Err(e) => {
                eprintln!("ligera: error: {e}");
                return EXIT_VMM_ERROR;
            }
        };
    log::info!("starting: {}", vmm::cli::describe(&config));
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("ligera: error: {e}");
        EXIT_VMM_ERROR
    };
    let mut vm = match builder::build_on(&config, foundation) {
        Ok(vm) => vm,
        Err(e) => return fail(&e),
    };
    if let Err(e) = vmm::vm::block_signals() {
        return fail(&e);
    }
    let bound = match vmm::api::bind(&config) {
        Ok(b) => b,
        Err(e) => return fail(&e),
    };
    if let Some(jailed) = jailed
        && let Err(e) = jailed.lock_down()
    {
        return fail(&format!("cannot lock the jail: {e}"));
    }
    let api = match vmm::api::serve(bound, &vm, &config) {
        Ok(api) => api,
        Err(e) => return fail(&e),
    };
    let reason = vm.run();
    drop(api);
    if let Some(message) = reason.message() {
        eprintln!("ligera: {message}");
    }
    vm.exit_process(reason.code())
}

/// `ligera image pull|ls|rm|prune`.
fn image_command(cmd: vmm::cli::ImageCommand) -> i32 {
    use vmm::cli::ImageCommand;
    use vmm::image;
    let fail = |e: image::ImageError| {
        eprintln!("ligera: error: {e}");
        EXIT_VMM_ERROR
    };
    match cmd {
        ImageCommand::Pull { reference } => match image::image_disk(&reference) {
            Ok((disk, _)) => {
                let id = disk.file_stem().unwrap_or_default().to_string_lossy();
                println!("{id}");
                EXIT_OK
            }
            Err(e) => fail(e),
        },
        ImageCommand::Ls => match image::cached_images() {
            Ok(list) => {
                println!("{:<28} {:>10} {:>10}", "ID", "SIZE", "UNUSED");
                for i in list {
                    println!(
                        "{:<28} {:>10} {:>9}s",
                        i.id,
                        vmm::config::format_size(i.bytes.div_ceil(1 << 20) << 20),
                        i.idle_secs
                    );
                }
                EXIT_OK
            }
            Err(e) => fail(e),
        },
        ImageCommand::Rm { id } => match image::remove_cached(Some(&id)) {
            Ok(removed) if removed.is_empty() => {
                eprintln!("ligera: error: no cached image {id}");
                EXIT_VMM_ERROR
            }
            Ok(removed) => {
                removed.iter().for_each(|r| println!("{r}"));
                EXIT_OK
            }
            Err(e) => fail(e),
        },
        ImageCommand::Prune => match image::remove_cached(None) {
            Ok(removed) => {
                removed.iter().for_each(|r| println!("{r}"));
                EXIT_OK
            }
            Err(e) => fail(e),
        },
    }
}

/// Help and version go to stdout with status 0; mistakes get one line on
/// stderr and status 2.
fn usage_error(e: clap::Error) -> i32 {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            EXIT_OK
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            EXIT_USAGE
        }
        _ => {
            // clap's message, up to its first blank line, folded into one line.
            let text = e.render().to_string();
            let message: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let message = message.join(" ");
            let message = message.strip_prefix("error: ").unwrap_or(&message);
            eprintln!("ligera: error: {message} (see 'ligera --help')");
            EXIT_USAGE
        }
    }
}
