//! qemu-img → img: for every qcow2 creation option qemu-img 10 offers, an image made by
//! qemu-img and edited with qemu-io converts to raw through `img` byte for byte equal to
//! qemu-img's own conversion.

mod common;

use common::{noise, Env, EDITS, MIB, SMALL};

/// How a test image is made.
enum Make {
    /// `qemu-img create -f qcow2 -o OPTS` (an empty option string means the defaults).
    Create(&'static str),
    /// `qemu-img convert -c -O qcow2 -o OPTS` from a raw file with compressible and
    /// incompressible data.
    Compress(&'static str),
}

/// Makes `t.qcow2` as `how` says, checks that `img` converts the fresh image like qemu-img,
/// edits it with qemu-io ([`EDITS`]), and checks the conversion again.
fn qemu_made_image_converts_like_qemu(how: Make) {
    let env = Env::with_qemu();
    match how {
        Make::Create(opts) => {
            let mut args = vec!["create", "-f", "qcow2"];
            if !opts.is_empty() {
                args.extend_from_slice(&["-o", opts]);
            }
            let size = SMALL.to_string();
            args.extend_from_slice(&["t.qcow2", &size]);
            env.qemu_img(&args).ok();
        }
        Make::Compress(opts) => {
            env.sparse_file("src.raw", SMALL);
            // Compressible patterns, incompressible noise, a hole, and data across 2 MiB.
            env.write_at("src.raw", 0, &[0x42; 300 * 1024]);
            env.write_at("src.raw", 400 * 1024, &noise(7, 200 * 1024));
            env.write_at("src.raw", 2 * MIB - 4096, &[0x99; 8192]);
            let mut text = Vec::new();
            while text.len() < 256 * 1024 {
                text.extend_from_slice(b"The quick brown fox jumps over the lazy dog. ");
            }
            env.write_at("src.raw", 3 * MIB, &text);
            let mut args = vec!["convert", "-c", "-f", "raw", "-O", "qcow2"];
            if !opts.is_empty() {
                args.extend_from_slice(&["-o", opts]);
            }
            args.extend_from_slice(&["src.raw", "t.qcow2"]);
            env.qemu_img(&args).ok();
        }
    }
    env.assert_converts_like_qemu("t.qcow2", &[]);
    env.qemu_io("qcow2", "t.qcow2", EDITS);
    env.qemu_img(&["check", "t.qcow2"]).ok();
    env.assert_converts_like_qemu("t.qcow2", &[]);
    // The same with the format named instead of probed.
    env.assert_converts_like_qemu("t.qcow2", &["-f", "qcow2"]);
}

macro_rules! matrix {
    ($($name:ident => $how:expr;)*) => {
        $(
            #[test]
            fn $name() {
                qemu_made_image_converts_like_qemu($how);
            }
        )*
        /// Every case, for tests that walk the whole matrix.
        #[allow(dead_code)]
        const ALL_CASES: &[(&str, fn() -> Make)] = &[$((stringify!($name), || $how),)*];
    };
}

matrix! {
    qemu_defaults_converts_like_qemu => Make::Create("");
    qemu_compat_0_10_converts_like_qemu => Make::Create("compat=0.10");
    qemu_compat_1_1_converts_like_qemu => Make::Create("compat=1.1");
    qemu_cluster_512_converts_like_qemu => Make::Create("cluster_size=512");
    qemu_cluster_1k_converts_like_qemu => Make::Create("cluster_size=1k");
    qemu_cluster_2k_converts_like_qemu => Make::Create("cluster_size=2k");
    qemu_cluster_4k_converts_like_qemu => Make::Create("cluster_size=4k");
    qemu_cluster_8k_converts_like_qemu => Make::Create("cluster_size=8k");
    qemu_cluster_16k_converts_like_qemu => Make::Create("cluster_size=16k");
    qemu_cluster_32k_converts_like_qemu => Make::Create("cluster_size=32k");
    qemu_cluster_64k_converts_like_qemu => Make::Create("cluster_size=64k");
    qemu_cluster_128k_converts_like_qemu => Make::Create("cluster_size=128k");
    qemu_cluster_256k_converts_like_qemu => Make::Create("cluster_size=256k");
    qemu_cluster_512k_converts_like_qemu => Make::Create("cluster_size=512k");
    qemu_cluster_1m_converts_like_qemu => Make::Create("cluster_size=1M");
    qemu_cluster_2m_converts_like_qemu => Make::Create("cluster_size=2M");
    qemu_compat_0_10_cluster_512_converts_like_qemu => Make::Create("compat=0.10,cluster_size=512");
    qemu_compat_0_10_cluster_2m_converts_like_qemu => Make::Create("compat=0.10,cluster_size=2M");
    qemu_refcount_1_converts_like_qemu => Make::Create("refcount_bits=1");
    qemu_refcount_2_converts_like_qemu => Make::Create("refcount_bits=2");
    qemu_refcount_4_converts_like_qemu => Make::Create("refcount_bits=4");
    qemu_refcount_8_converts_like_qemu => Make::Create("refcount_bits=8");
    qemu_refcount_16_converts_like_qemu => Make::Create("refcount_bits=16");
    qemu_refcount_32_converts_like_qemu => Make::Create("refcount_bits=32");
    qemu_refcount_64_converts_like_qemu => Make::Create("refcount_bits=64");
    qemu_refcount_1_cluster_512_converts_like_qemu => Make::Create("refcount_bits=1,cluster_size=512");
    qemu_refcount_64_cluster_512_converts_like_qemu => Make::Create("refcount_bits=64,cluster_size=512");
    qemu_lazy_refcounts_converts_like_qemu => Make::Create("lazy_refcounts=on");
    qemu_extended_l2_16k_converts_like_qemu => Make::Create("extended_l2=on,cluster_size=16k");
    qemu_extended_l2_64k_converts_like_qemu => Make::Create("extended_l2=on");
    qemu_extended_l2_256k_converts_like_qemu => Make::Create("extended_l2=on,cluster_size=256k");
    qemu_extended_l2_2m_converts_like_qemu => Make::Create("extended_l2=on,cluster_size=2M");
    qemu_data_file_converts_like_qemu => Make::Create("data_file=t.data");
    qemu_data_file_raw_converts_like_qemu => Make::Create("data_file=t.data,data_file_raw=on");
    qemu_data_file_extended_l2_converts_like_qemu => Make::Create("data_file=t.data,extended_l2=on");
    qemu_prealloc_off_converts_like_qemu => Make::Create("preallocation=off");
    qemu_prealloc_metadata_converts_like_qemu => Make::Create("preallocation=metadata");
    qemu_prealloc_falloc_converts_like_qemu => Make::Create("preallocation=falloc");
    qemu_prealloc_full_converts_like_qemu => Make::Create("preallocation=full");
    qemu_prealloc_metadata_v2_converts_like_qemu => Make::Create("compat=0.10,preallocation=metadata");
    qemu_prealloc_metadata_extended_l2_converts_like_qemu =>
        Make::Create("preallocation=metadata,extended_l2=on");
    qemu_zlib_compressed_converts_like_qemu => Make::Compress("");
    qemu_zlib_compressed_v2_converts_like_qemu => Make::Compress("compat=0.10");
    qemu_zlib_compressed_4k_converts_like_qemu => Make::Compress("cluster_size=4k");
    qemu_zlib_compressed_2m_converts_like_qemu => Make::Compress("cluster_size=2M");
    qemu_zstd_compressed_converts_like_qemu => Make::Compress("compression_type=zstd");
    qemu_zstd_compressed_512_converts_like_qemu =>
        Make::Compress("compression_type=zstd,cluster_size=512");
    qemu_zstd_compressed_2m_converts_like_qemu =>
        Make::Compress("compression_type=zstd,cluster_size=2M");
    qemu_zstd_compressed_extended_l2_converts_like_qemu =>
        Make::Compress("compression_type=zstd,extended_l2=on");
}

/// `img check` agrees with `qemu-img check` (exit 0, clean) on every qemu-made, qemu-edited
/// image of the matrix. One test for the lot, so that a check not yet written fails once.
#[test]
fn qemu_made_images_img_check_clean() {
    let mut failures = Vec::new();
    for (name, make) in ALL_CASES {
        let env = Env::with_qemu();
        match make() {
            Make::Create(opts) => {
                let size = SMALL.to_string();
                let mut args = vec!["create", "-f", "qcow2"];
                if !opts.is_empty() {
                    args.extend_from_slice(&["-o", opts]);
                }
                args.extend_from_slice(&["t.qcow2", &size]);
                env.qemu_img(&args).ok();
            }
            Make::Compress(opts) => {
                env.sparse_file("src.raw", SMALL);
                env.write_at("src.raw", 0, &[0x42; 300 * 1024]);
                env.write_at("src.raw", 400 * 1024, &noise(7, 200 * 1024));
                let mut args = vec!["convert", "-c", "-O", "qcow2"];
                if !opts.is_empty() {
                    args.extend_from_slice(&["-o", opts]);
                }
                args.extend_from_slice(&["src.raw", "t.qcow2"]);
                env.qemu_img(&args).ok();
            }
        }
        env.qemu_io("qcow2", "t.qcow2", EDITS);
        let theirs = env.qemu_img(&["check", "t.qcow2"]);
        let ours = env.img(&["check", "t.qcow2"]).no_panic();
        if ours.code != theirs.code {
            failures.push(format!("{name}: img check {ours}\nqemu-img check {theirs}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
