//! Persistent dirty bitmaps (qcow2's bitmaps extension): images whose bitmaps qemu-img made,
//! read, checked and written by `img`, and compared with what qemu-img says about them.

mod common;

use common::Env;

/// `t.qcow2`, 8 MiB, with an enabled bitmap `b0`, a disabled `b1` of 128 KiB granularity and an
/// enabled `b2` of 512-byte granularity, all made by qemu-img; qemu-io then writes 1 MiB, which
/// dirties the enabled bitmaps.
fn image_with_bitmaps(env: &Env) {
    env.qemu_img(&["create", "-f", "qcow2", "t.qcow2", "8M"])
        .ok();
    env.qemu_img(&["bitmap", "--add", "t.qcow2", "b0"]).ok();
    env.qemu_img(&[
        "bitmap",
        "--add",
        "--disable",
        "-g",
        "128k",
        "t.qcow2",
        "b1",
    ])
    .ok();
    env.qemu_img(&["bitmap", "--add", "-g", "512", "t.qcow2", "b2"])
        .ok();
    env.qemu_io("qcow2", "t.qcow2", &["write -P 0x11 0 1M"]);
}

#[test]
fn info_qemu_bitmaps_equals_qemu() {
    let env = Env::with_qemu();
    image_with_bitmaps(&env);
    for args in [
        &["info", "t.qcow2"][..],
        &["info", "--output=json", "t.qcow2"],
    ] {
        let ours = env.img(args).ok();
        let theirs = env.qemu_img(args).ok();
        assert_eq!(ours.stdout, theirs.stdout, "{args:?}");
    }
    assert!(env
        .img(&["info", "t.qcow2"])
        .ok()
        .stdout
        .contains("bitmaps:"));
}

#[test]
fn check_qemu_bitmaps_is_clean_like_qemu() {
    let env = Env::with_qemu();
    image_with_bitmaps(&env);
    let theirs = env.qemu_img(&["check", "t.qcow2"]).ok();
    let ours = env.img(&["check", "t.qcow2"]).ok();
    assert_eq!(ours.stdout, theirs.stdout);
}

#[test]
fn check_bad_bitmap_table_entry_is_corruption() {
    let env = Env::with_qemu();
    image_with_bitmaps(&env);
    // Set a reserved bit in the first table entry of the first bitmap.
    let b = env.read("t.qcow2");
    let be64 = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    let ext = b
        .windows(4)
        .position(|w| w == [0x23, 0x85, 0x28, 0x75])
        .unwrap();
    let dir = usize::try_from(be64(ext + 8 + 16)).unwrap();
    let table = be64(dir);
    let entry = be64(usize::try_from(table).unwrap());
    env.write_at("t.qcow2", table, &(entry | 2).to_be_bytes());
    let out = env.img(&["check", "t.qcow2"]).code_is(2);
    assert!(out.stderr.contains("reserved bits set"), "{out}");
}
