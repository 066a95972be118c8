//! The integration harness: makes GRUB images of the real kernel, boots them under QEMU (TCG) and
//! Bochs, captures the serial console line by line with the time each line appeared, enforces
//! timeouts, and always kills what it started (the [`Machine`] drop kills the emulator and removes
//! its working directory).
//!
//! `xtask` uses the same code for `image`, `run` and `demo`, so what the tests boot is what a
//! user boots.

pub mod cluster;
pub mod counters;
pub mod netns;

pub mod guests;

pub mod plot;

pub mod report;

pub mod standalone;

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// QEMU's exit code when the kernel wrote "success" to isa-debug-exit: `(0x10 << 1) | 1`.
pub const QEMU_EXIT_SUCCESS: i32 = 33;
/// QEMU's exit code when the kernel wrote "failure": `(0x11 << 1) | 1`.
pub const QEMU_EXIT_FAILURE: i32 = 35;
/// The line the kernel prints right before it leaves the emulator.
pub const EXIT_MARKER: &str = "COLO-EXIT status=";
/// The first line Rust code prints.
pub const FIRST_RUST_LINE: &str = "COLO hypervisor";

/// UEFI firmware from Debian's `ovmf` package.
pub const OVMF_FIRMWARE: &str = "/usr/share/ovmf/OVMF.fd";
const BOCHS_BIOS: &str = "/usr/share/bochs/BIOS-bochs-latest";
const BOCHS_VGA_BIOS: &str = "/usr/share/vgabios/vgabios.bin";
/// The emulated CMOS clock at power-on (2026-01-01 00:00 UTC), not the host's: runs repeat.
const BOCHS_TIME0: u64 = 1_767_225_600;

/// What went wrong in the harness (as opposed to what the kernel did).
#[derive(Debug)]
pub enum HarnessError {
    /// A tool could not be started.
    Spawn {
        /// The program.
        program: String,
        /// Why.
        error: io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// A tool ran and failed.
    ToolFailed {
        /// The program.
        program: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed.
        output: String,
    },
    /// A file the harness needs is missing.
    Missing {
        /// The path.
        path: PathBuf,
        /// What to do about it.
        hint: &'static str,
    },
    /// Waiting ran out of time.
    Timeout {
        /// What was awaited.
        what: String,
        /// How long we waited.
        after: Duration,
        /// The serial console so far.
        serial: String,
    },
    /// The emulator exited before what was awaited appeared: its own last words say why.
    EmulatorDied {
        /// What was awaited.
        what: String,
        /// The emulator's exit report ([`Machine::exit_report`]): status, the tail of its
        /// stderr and log, and where the full logs were kept.
        report: String,
    },
    /// Other I/O.
    Io(io::Error),
}

impl fmt::Display for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Spawn { program, error, hint } => write!(f, "cannot start `{program}`: {error}; {hint}"),
            Self::ToolFailed { program, status, output } => write!(f, "`{program}` failed ({status}):\n{output}"),
            Self::Missing { path, hint } => write!(f, "{} is missing; {hint}", path.display()),
            Self::Timeout { what, after, serial } => {
                write!(f, "timed out after {after:?} waiting for {what}; serial console so far:\n{serial}")
            }
            Self::EmulatorDied { what, report } => write!(f, "the emulator exited before {what}:\n{report}"),
            Self::Io(e) => write!(f, "I/O error: {e}"),
        }
    }
}

impl std::error::Error for HarnessError {}

impl From<io::Error> for HarnessError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// The workspace root (this crate sits one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("qemu-tests lives in the workspace").to_path_buf()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` (relative to the workspace root) or `target/`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// The kernel ELF that `cargo xtask build` leaves behind.
pub fn kernel_path() -> PathBuf {
    target_dir().join("colo-kernel")
}

/// The kernel, or an error saying how to build it.
pub fn built_kernel() -> Result<PathBuf, HarnessError> {
    let path = kernel_path();
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::Missing { path, hint: "build it with `cargo xtask build` (or run `cargo xtask test`)" })
    }
}

/// A fresh scratch directory under `target/harness/`, removed when dropped unless
/// [`ScratchDir::keep`] was called (the logs of an emulator that died stay for the user).
#[derive(Debug)]
pub struct ScratchDir(PathBuf, AtomicBool);

impl ScratchDir {
    /// Creates `target/harness/<name>-<pid>-<n>`.
    pub fn new(name: &str) -> Result<Self, HarnessError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = target_dir().join("harness").join(format!("{name}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        Ok(Self(dir, AtomicBool::new(false)))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Leaves the directory in place when dropped.
    pub fn keep(&self) {
        self.1.store(true, Ordering::Relaxed);
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !self.1.load(Ordering::Relaxed) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A file loaded next to the kernel as a multiboot2 module.
#[derive(Clone, Debug)]
pub struct ImageModule {
    /// The file on the host.
    pub path: PathBuf,
    /// Its name inside the image; the module command line starts with it.
    pub name: String,
    /// The rest of the module command line (`key=value` words), possibly empty.
    pub args: String,
}

/// The name of the multiboot2 module holding the management token (`net::auth::TOKEN_MODULE`).
pub const MGMT_TOKEN_MODULE: &str = "mgmt-token";

/// Writes a fresh management token to `path` (32 bytes from `/dev/urandom`, hex-encoded, no
/// newline; file mode 0600) and returns it. The hypervisor reads it from the `mgmt-token`
/// module ([`mgmt_token_module`]); `cargo xtask ctl --token-file` sends it.
pub fn write_mgmt_token(path: &Path) -> Result<String, HarnessError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut random = [0u8; 32];
    fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let _ = fs::remove_file(path);
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    io::Write::write_all(&mut file, hex.as_bytes())?;
    Ok(hex)
}

/// The image module that carries the token file at `path` (see [`write_mgmt_token`]).
pub fn mgmt_token_module(path: &Path) -> ImageModule {
    ImageModule { path: path.into(), name: MGMT_TOKEN_MODULE.into(), args: String::new() }
}

/// The name of the multiboot2 module holding the cluster key (`net::repl::nic::CLUSTER_KEY_MODULE`).
pub const CLUSTER_KEY_MODULE: &str = "cluster-key";

/// Writes a fresh cluster key to `path`: exactly 32 bytes from `/dev/urandom` (file mode 0600).
/// Both hosts of a pair get the same file as their `cluster-key` module ([`cluster_key_module`]).
pub fn write_cluster_key(path: &Path) -> Result<(), HarnessError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = [0u8; 32];
    fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let _ = fs::remove_file(path);
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    io::Write::write_all(&mut file, &key)?;
    Ok(())
}

/// The image module that carries the cluster key file at `path` (see [`write_cluster_key`]).
pub fn cluster_key_module(path: &Path) -> ImageModule {
    ImageModule { path: path.into(), name: CLUSTER_KEY_MODULE.into(), args: String::new() }
}

/// Writes a hybrid BIOS+UEFI GRUB image (ISO 9660 with MBR and EFI partition, so the same file
/// boots as a CD-ROM or, written to a USB stick, as a disk) that boots `kernel` with `cmdline`.
pub fn make_image(kernel: &Path, cmdline: &str, modules: &[ImageModule], out: &Path) -> Result<(), HarnessError> {
    if !kernel.is_file() {
        return Err(HarnessError::Missing { path: kernel.into(), hint: "build it with `cargo xtask build`" });
    }
    let staging = ScratchDir::new("image")?;
    let boot = staging.path().join("boot");
    fs::create_dir_all(boot.join("grub"))?;
    fs::copy(kernel, boot.join("colo-kernel"))?;
    let mut module_lines = String::new();
    for module in modules {
        fs::copy(&module.path, boot.join(&module.name))?;
        let line = format!("{} {}", module.name, module.args);
        module_lines += &format!("  module2 /boot/{} {}\n", module.name, line.trim_end());
    }
    let grub_cfg = format!(
        "set timeout=0\nset default=0\n\
         menuentry \"COLO hypervisor\" {{\n  multiboot2 /boot/colo-kernel {cmdline}\n{module_lines}  boot\n}}\n"
    );
    fs::write(boot.join("grub/grub.cfg"), grub_cfg)?;
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent)?;
    }
    let output = Command::new("grub-mkrescue").arg("-o").arg(out).arg(staging.path()).output().map_err(|error| {
        HarnessError::Spawn {
            program: "grub-mkrescue".into(),
            error,
            hint: "install the boot tools with `cargo xtask deps`",
        }
    })?;
    if !output.status.success() {
        return Err(HarnessError::ToolFailed {
            program: "grub-mkrescue".into(),
            status: output.status,
            output: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(())
}

/// Which emulator runs the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emulator {
    /// QEMU with TCG (AMD-V with NPT available as `-cpu max`).
    Qemu,
    /// Bochs (VT-x with EPT and PML on the `tigerlake` model).
    Bochs,
    /// QEMU with KVM and the host CPU passed through (nested VT-x on Intel hosts that allow it).
    QemuKvm,
}

/// How the image is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootMedium {
    /// As a CD-ROM, BIOS firmware.
    Cdrom,
    /// As a USB mass-storage device, SeaBIOS (QEMU only).
    UsbBios,
    /// As a USB mass-storage device, OVMF UEFI firmware (QEMU only).
    UsbUefi,
}

/// How to start a machine.
#[derive(Clone, Debug)]
pub struct MachineConfig {
    /// The emulator.
    pub emulator: Emulator,
    /// How the image is attached.
    pub medium: BootMedium,
    /// The image.
    pub image: PathBuf,
    /// Guest-physical RAM of the emulated host, in MiB.
    pub memory_mib: u32,
    /// QEMU `-cpu` value or Bochs `cpu: model=` value.
    pub cpu: String,
    /// Extra emulator arguments (QEMU) or bochsrc lines (Bochs).
    pub extra: Vec<String>,
}

impl MachineConfig {
    /// Defaults for `emulator`: QEMU `-cpu max` (SVM+NPT under TCG), Bochs `tigerlake` (VMX+EPT+PML).
    pub fn new(emulator: Emulator, medium: BootMedium, image: &Path) -> Self {
        let cpu = match emulator {
            Emulator::Qemu => "max",
            Emulator::Bochs => "tigerlake",
            Emulator::QemuKvm => "host,+vmx",
        };
        Self { emulator, medium, image: image.into(), memory_mib: 512, cpu: cpu.into(), extra: Vec::new() }
    }
}

/// A serial console line and when it appeared, measured from emulator start.
#[derive(Clone, Debug)]
pub struct SerialLine {
    /// Time since the emulator process was started.
    pub at: Duration,
    /// The line without its newline.
    pub text: String,
}

/// How a machine ended.
#[derive(Debug)]
pub struct Outcome {
    /// The emulator's exit code (QEMU: 33 success, 35 failure; Bochs: always 1).
    pub exit_code: Option<i32>,
    /// The status printed in the `COLO-EXIT status=N` line, if the kernel got that far.
    pub verdict: Option<u32>,
    /// The whole serial console.
    pub serial: String,
    /// Wall time from start to exit.
    pub elapsed: Duration,
    /// When the kernel gave no verdict: the emulator's exit report (status, its own last
    /// words, where its full logs were kept).
    pub emulator_report: Option<String>,
}

/// A running emulator. Dropping it kills the emulator and removes its scratch directory.
#[derive(Debug)]
pub struct Machine {
    child: Child,
    config: MachineConfig,
    started: Instant,
    lines: Arc<Mutex<Vec<SerialLine>>>,
    stop_tail: Arc<AtomicBool>,
    tail: Option<thread::JoinHandle<()>>,
    scratch: ScratchDir,
}

impl Machine {
    /// Starts the emulator. The serial console goes to a file that a thread follows.
    pub fn start(config: MachineConfig, name: &str) -> Result<Self, HarnessError> {
        if !config.image.is_file() {
            return Err(HarnessError::Missing { path: config.image.clone(), hint: "make it with `cargo xtask image`" });
        }
        let scratch = ScratchDir::new(name)?;
        let serial_path = scratch.path().join("serial.log");
        fs::write(&serial_path, b"")?;
        let mut command = match config.emulator {
            Emulator::Qemu | Emulator::QemuKvm => qemu_command(&config, &serial_path)?,
            Emulator::Bochs => bochs_command(&config, &serial_path, scratch.path())?,
        };
        let program = format!("{:?}", command.get_program());
        pin_environment(&mut command, scratch.path());
        let started = Instant::now();
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(fs::File::create(scratch.path().join("emulator.out"))?))
            .stderr(Stdio::from(fs::File::create(scratch.path().join("emulator.err"))?))
            .spawn()
            .map_err(|error| HarnessError::Spawn {
                program,
                error,
                hint: "install the emulators with `cargo xtask deps`",
            })?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stop_tail = Arc::new(AtomicBool::new(false));
        let tail = {
            let (lines, stop) = (lines.clone(), stop_tail.clone());
            thread::spawn(move || follow_serial(&serial_path, started, &lines, &stop))
        };
        Ok(Self { child, config, started, lines, stop_tail, tail: Some(tail), scratch })
    }

    /// The serial console so far.
    pub fn serial(&self) -> String {
        let lines = self.lines.lock().expect("serial lines lock");
        lines.iter().map(|l| l.text.as_str()).collect::<Vec<_>>().join("\n")
    }

    /// The serial lines so far, with their times.
    pub fn lines(&self) -> Vec<SerialLine> {
        self.lines.lock().expect("serial lines lock").clone()
    }

    /// Waits for a serial line containing `needle`; returns it.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<SerialLine, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.lines().into_iter().find(|l| l.text.contains(needle)) {
                return Ok(line);
            }
            let exited = self.child.try_wait()?.is_some();
            if Instant::now() > deadline || exited {
                // One last look: the line may have landed as the emulator exited.
                thread::sleep(Duration::from_millis(100));
                if let Some(line) = self.lines().into_iter().find(|l| l.text.contains(needle)) {
                    return Ok(line);
                }
                if let Some(report) = self.exit_report() {
                    return Err(HarnessError::EmulatorDied {
                        what: format!("`{needle}` appeared on the serial console"),
                        report,
                    });
                }
                return Err(HarnessError::Timeout {
                    what: format!("`{needle}` on the serial console ({:?})", self.config.emulator),
                    after: self.started.elapsed(),
                    serial: self.serial(),
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Hands every serial line to `show` as it appears, until the emulator exits (or `timeout`).
    pub fn stream(&mut self, timeout: Option<Duration>, mut show: impl FnMut(&SerialLine)) -> Result<(), HarnessError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut shown = 0;
        loop {
            let exited = self.child.try_wait()?.is_some();
            if exited {
                self.stop_following();
            }
            let lines = self.lines();
            for line in &lines[shown..] {
                show(line);
            }
            shown = lines.len();
            if exited {
                return Ok(());
            }
            if deadline.is_some_and(|d| Instant::now() > d) {
                return Err(HarnessError::Timeout {
                    what: format!("{:?} to exit", self.config.emulator),
                    after: self.started.elapsed(),
                    serial: self.serial(),
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the emulator to exit by itself, then reports how it ended. An emulator that
    /// exits before the hypervisor's first line is an error ([`HarnessError::EmulatorDied`]).
    pub fn wait_exit(mut self, timeout: Duration) -> Result<Outcome, HarnessError> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout {
                    what: format!("{:?} to exit", self.config.emulator),
                    after: self.started.elapsed(),
                    serial: self.serial(),
                });
            }
            thread::sleep(Duration::from_millis(20));
        };
        let elapsed = self.started.elapsed();
        self.stop_following();
        let serial = self.serial();
        let verdict = serial.lines().find_map(|l| l.split_once(EXIT_MARKER).and_then(|(_, v)| v.trim().parse().ok()));
        let emulator_report = if verdict.is_none() { self.exit_report() } else { None };
        if let Some(report) = emulator_report.as_ref().filter(|_| !serial.contains(FIRST_RUST_LINE)) {
            // Nothing of the kernel ran: whatever the caller expected, this is the emulator's death.
            return Err(HarnessError::EmulatorDied {
                what: "the hypervisor's first line".into(),
                report: report.clone(),
            });
        }
        Ok(Outcome { exit_code: status.code(), verdict, serial, elapsed, emulator_report })
    }

    /// Where this machine's files are: `serial.log`, `emulator.err`, `emulator.out`, and for
    /// Bochs `bochsrc` and `bochs.log`.
    pub fn logs_dir(&self) -> &Path {
        self.scratch.path()
    }

    /// If the emulator has exited: its exit status, the serial console's last lines, the tail of
    /// its stderr, stdout and (Bochs) log file, and the directory holding them in full, which is
    /// then kept after the machine is dropped. `None` while it runs.
    pub fn exit_report(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok().flatten()?;
        self.scratch.keep();
        let mut report = format!(
            "{:?} exited with {status} after {:.2} s",
            self.config.emulator,
            self.started.elapsed().as_secs_f64()
        );
        let serial = self.serial();
        if !serial.contains(FIRST_RUST_LINE) {
            report += " (the hypervisor never printed its first line)";
        }
        for (file, what) in [
            ("emulator.err", "stderr"),
            ("emulator.out", "stdout"),
            ("bochs.log", "bochs.log"),
            ("serial.log", "serial console"),
        ] {
            let text = fs::read(self.scratch.path().join(file)).unwrap_or_default();
            let tail = last_lines(&String::from_utf8_lossy(&text), 12);
            if !tail.is_empty() {
                report += &format!("\n--- last lines of its {what} ---\n{tail}");
            }
        }
        report += &format!("\n--- full logs kept in {} ---", self.scratch.path().display());
        Some(report)
    }

    fn stop_following(&mut self) {
        self.stop_tail.store(true, Ordering::Relaxed);
        if let Some(tail) = self.tail.take() {
            let _ = tail.join();
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stop_following();
    }
}

/// Follows the serial file, splitting it into timestamped lines, until told to stop (and then
/// reads what is left).
fn follow_serial(path: &Path, started: Instant, lines: &Mutex<Vec<SerialLine>>, stop: &AtomicBool) {
    let Ok(mut file) = fs::File::open(path) else {
        return;
    };
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        loop {
            match file.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        }
        let at = started.elapsed();
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = pending.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&raw).trim_end_matches(['\r', '\n']).to_string();
            lines.lock().expect("serial lines lock").push(SerialLine { at, text });
        }
        if stopping {
            if !pending.is_empty() {
                let text = String::from_utf8_lossy(&pending).into_owned();
                lines.lock().expect("serial lines lock").push(SerialLine { at, text });
            }
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// The last `n` non-empty lines of `text`, without Bochs' banner rulers.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("=====")).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Emulators see only what is set here, not the caller's environment: no sound, display,
/// plugin-path or locale settings leak in from the host (`BXSHARE`, `LTDL_LIBRARY_PATH`,
/// `DISPLAY`, `ALSA_*`, `QEMU_AUDIO_DRV`, ...). `HOME` is the scratch directory, so no dotfile
/// of the user's is read.
fn pin_environment(command: &mut Command, scratch: &Path) {
    command
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .env("HOME", scratch)
        .env("LANG", "C");
}

fn qemu_command(config: &MachineConfig, serial: &Path) -> Result<Command, HarnessError> {
    let mut c = Command::new("qemu-system-x86_64");
    let accel = if config.emulator == Emulator::QemuKvm { "kvm" } else { "tcg" };
    c.args(["-machine", "q35", "-accel", accel, "-cpu", &config.cpu, "-m", &config.memory_mib.to_string()]);
    // `-nodefaults -no-user-config`: no default devices and no /etc/qemu/*.conf from the host.
    c.args(["-display", "none", "-monitor", "none", "-no-reboot", "-nodefaults", "-no-user-config"]);
    c.arg("-serial").arg(format!("file:{}", serial.display()));
    c.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
    // The image is never written: `snapshot=on` keeps each run independent.
    let image = config.image.display();
    match config.medium {
        BootMedium::Cdrom => {
            c.args(["-drive", &format!("if=none,id=boot,format=raw,media=cdrom,readonly=on,file={image}")]);
            c.args(["-device", "ide-cd,drive=boot,bootindex=0"]);
        }
        BootMedium::UsbBios | BootMedium::UsbUefi => {
            c.args(["-drive", &format!("if=none,id=boot,format=raw,snapshot=on,file={image}")]);
            c.args(["-device", "qemu-xhci,id=xhci", "-device", "usb-storage,bus=xhci.0,drive=boot,bootindex=0"]);
        }
    }
    if config.medium == BootMedium::UsbUefi {
        let firmware = Path::new(OVMF_FIRMWARE);
        if !firmware.is_file() {
            return Err(HarnessError::Missing {
                path: firmware.into(),
                hint: "install `ovmf` with `cargo xtask deps`",
            });
        }
        c.arg("-bios").arg(firmware);
    }
    c.args(&config.extra);
    Ok(c)
}

fn bochs_command(config: &MachineConfig, serial: &Path, scratch: &Path) -> Result<Command, HarnessError> {
    if config.medium != BootMedium::Cdrom {
        return Err(HarnessError::Missing {
            path: "bochs USB boot".into(),
            hint: "Bochs boots the image as a CD-ROM only; use QEMU for USB media",
        });
    }
    let mut rc = format!(
        "megs: {mem}\n\
         cpu: model={cpu}, ips=50000000\n\
         romimage: file={BOCHS_BIOS}\n\
         vgaromimage: file={BOCHS_VGA_BIOS}\n\
         ata0-master: type=cdrom, path={image}, status=inserted\n\
         boot: cdrom\n\
         com1: enabled=1, mode=file, dev={serial}\n\
         display_library: rfb, options=\"timeout=0\"\n\
         clock: sync=none, time0={BOCHS_TIME0}\n\
         log: {log}\n\
         panic: action=fatal\nerror: action=report\ninfo: action=ignore\ndebug: action=ignore\n\
         mouse: enabled=0\n\
         sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy\n\
         speaker: enabled=0\n\
         plugin_ctrl: speaker=0, parallel=0, gameport=0, iodebug=0\n\
         keyboard: type=mf, keymap=\n",
        mem = config.memory_mib,
        cpu = config.cpu,
        image = config.image.display(),
        serial = serial.display(),
        log = scratch.join("bochs.log").display(),
    );
    for line in &config.extra {
        rc += line;
        rc.push('\n');
    }
    let rc_path = scratch.join("bochsrc");
    fs::write(&rc_path, rc)?;
    // The Debian build has the internal debugger, which stops at a prompt: feed it a script.
    let script = scratch.join("debugger.rc");
    fs::write(&script, "continue\nquit\n")?;
    let mut c = Command::new("bochs-bin");
    c.arg("-q").arg("-f").arg(&rc_path).arg("-rc").arg(&script);
    Ok(c)
}
