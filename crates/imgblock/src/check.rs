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
    /// One line per problem, in the words qemu-img uses (the first [`Messages::MAX`] of them).
    pub messages: Messages,
    /// Set when the check stopped short (a repair it would need but was not allowed): why, in
    /// qemu-img's words. qemu-img then prints the messages but no report, and fails.
    pub failed: Option<String>,
}

/// The per-problem lines of a check, in the words qemu-img uses. A hostile image can hold
/// millions of problems (every entry of every table pointing at the same cluster): the first
/// [`Messages::MAX`] lines are kept, and the rest only counted, so that a check takes bounded
/// memory. qemu-img prints every line as it goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Messages {
    lines: Vec<String>,
    omitted: u64,
}

impl Messages {
    /// Most lines kept (about a megabyte of text).
    pub const MAX: usize = 10_000;

    /// Adds a line, or counts it once [`Messages::MAX`] are kept.
    pub fn push(&mut self, line: String) {
        if self.lines.len() < Self::MAX {
            self.lines.push(line);
        } else {
            self.omitted += 1;
        }
    }

    /// Adds every line of `other` after these, leaving it empty.
    pub fn append(&mut self, other: &mut Messages) {
        let other = std::mem::take(other);
        self.extend(other);
    }

    /// Adds every line of `other` after these.
    pub fn extend(&mut self, other: Messages) {
        for line in other.lines {
            self.push(line);
        }
        self.omitted += other.omitted;
    }

    /// Lines found past [`Messages::MAX`] and not kept.
    pub fn omitted(&self) -> u64 {
        self.omitted
    }

    /// The kept lines, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, String> {
        self.lines.iter()
    }

    /// How many lines are kept.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Whether no line was added.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty() && self.omitted == 0
    }
}

impl<'a> IntoIterator for &'a Messages {
    type Item = &'a String;
    type IntoIter = std::slice::Iter<'a, String>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_past_max_are_counted_not_kept() {
        let mut m = Messages::default();
        for i in 0..Messages::MAX + 5 {
            m.push(format!("line {i}"));
        }
        assert_eq!(m.len(), Messages::MAX);
        assert_eq!(m.omitted(), 5);
        assert_eq!(m.iter().last().map(String::as_str), Some("line 9999"));
        let mut more = Messages::default();
        more.push("x".into());
        m.append(&mut more);
        assert!(more.is_empty());
        assert_eq!((m.len(), m.omitted()), (Messages::MAX, 6));
    }
}
