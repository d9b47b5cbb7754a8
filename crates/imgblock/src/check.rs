//! Consistency checks (`img check`), reported with qemu-img's counters.

/// What `check` may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Repair {
    /// Only report.
    #[default]
    None,
    /// Free leaked clusters.
    Leaks,
    /// Fix leaks and corruptions that can be fixed safely.
    All,
}

/// The result of a check, with qemu-img's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Corruptions found (and not fixed).
    pub corruptions: u64,
    /// Leaked clusters found (and not fixed).
    pub leaks: u64,
    /// Errors that prevented checking part of the image.
    pub check_errors: u64,
    /// Corruptions that were fixed.
    pub corruptions_fixed: u64,
    /// Leaks that were fixed.
    pub leaks_fixed: u64,
    /// Data clusters in use by the guest view.
    pub allocated_clusters: u64,
    /// Clusters the virtual disk spans.
    pub total_clusters: u64,
    /// Allocated clusters not contiguous with the previous one.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// Offset just past the last used cluster.
    pub image_end_offset: Option<u64>,
    /// One line per problem, in the words qemu-img uses.
    pub messages: Vec<String>,
    /// Set when the check stopped short (a repair it would need but was not allowed): why, in
    /// qemu-img's words. qemu-img then prints the messages but no report, and fails.
    pub failed: Option<String>,
}
