//! `clipa train --devices` through the binary: the data-parallel path with
//! the CPU's one device trains like a plain run, and mistakes in the device
//! list are one-line errors. (Replicas on several devices are tested in
//! `clipa-core`'s unit tests, on CPU devices in one process.)

use crate::common::{clipa, curve, s, scratch, text};

#[test]
fn devices_all_on_the_cpu_trains_like_a_plain_run() {
    let dir_tmp = scratch();
    let dir = dir_tmp.path();
    let run = |name: &str, extra: &[&str]| {
        let out_dir = dir.join(name);
        let flags = [
            "train",
            "--preset",
            "tiny",
            "--steps",
            "3",
            "--batch-size",
            "8",
            "--log-every",
            "1",
            "--workers=1",
            "--output",
            s(&out_dir),
        ];
        let out = clipa(&[&flags[..], extra].concat());
        let (_, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        (curve(&out_dir), stderr)
    };
    let (plain, _) = run("plain", &[]);
    let (all, stderr) = run("all", &["--devices", "all"]);
    assert!(stderr.contains("training on cpu:0"), "{stderr}");
    assert_eq!(plain.len(), 3);
    assert_eq!(plain, all);
}

#[test]
fn device_list_mistakes_are_one_line_errors() {
    let dir_tmp = scratch();
    let dir = dir_tmp.path();
    let out_dir = dir.join("run");
    let cases: [(&str, &str); 3] = [
        ("0,256", "at most 256 replicas"),
        ("0,0", "listed twice"),
        ("0,x", "'x' is not a device index"),
    ];
    for (list, want) in cases {
        let flags = [
            "train",
            "--preset",
            "tiny",
            "--steps",
            "1",
            "--output",
            s(&out_dir),
        ];
        let out = clipa(&[&flags[..], &["--devices", list]].concat());
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{list}: {stderr}");
        // clap's own usage errors add a "try --help" line; ours are one line.
        let first = stderr.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("error: ") && first.contains(want),
            "{list}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{list}: {stderr}");
    }
}
