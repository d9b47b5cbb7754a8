//! Virtio devices: the virtio-mmio transport, the block device, its I/O thread and throttling.

pub mod block;
pub mod mmio;
pub mod throttle;
pub mod worker;
