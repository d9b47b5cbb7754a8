//! Virtio devices: the virtio-mmio transport, the block device and its I/O thread.

pub mod block;
pub mod mmio;
pub mod worker;
