// TEMPORARY experiment (helper); deleted before hand-back.
use qemu_tests::guests::guest_path;
use qemu_tests::*;
use std::time::Duration;

#[test]
fn zz_spinner_bochs() {
    let secs: u64 = std::env::var("ZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let emu = if std::env::var("ZZ_QEMU").is_ok() { Emulator::Qemu } else { Emulator::Bochs };
    let kernel = built_kernel().unwrap();
    let scratch = ScratchDir::new("zzimg").unwrap();
    let image = scratch.path().join("colo.img");
    let list = std::env::var("ZZ_GUESTS").unwrap_or("guest-spinner:time_limit_ms=300,guest-hello:".into());
    let modules: Vec<ImageModule> = list
        .split(',')
        .map(|g| {
            let (n, a) = g.split_once(':').unwrap();
            ImageModule { path: guest_path(n), name: n.into(), args: a.into() }
        })
        .collect();
    make_image(&kernel, "guest_mem=16M", &modules, &image).unwrap();
    let mut config = MachineConfig::new(emu, BootMedium::Cdrom, &image);
    config.cpu = if emu == Emulator::Bochs { "ryzen".into() } else { "max".into() };
    if let Ok(extra) = std::env::var("ZZ_EXTRA") {
        config.extra = extra.split(';').map(String::from).collect();
    }
    let mut m = Machine::start(config, "zzexp").unwrap();
    let r = m.wait_for("COLO-EXIT", Duration::from_secs(secs));
    let _ = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "rm -rf /tmp/zzexp/*; cp -r {}/harness/zzexp-{}-* /tmp/zzexp/",
            target_dir().display(),
            std::process::id()
        ))
        .status();
    println!("{}", m.serial());
    println!("result: {:?}", r.map(|l| l.at));
}
