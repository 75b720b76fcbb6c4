//! Default sizes, shared by the configurations (a budget usually overrides them).

/// LoRA rank.
pub fn rank() -> usize {
    8
}

/// Adapter bottleneck width.
pub fn bottleneck() -> usize {
    16
}

/// Prompt or prefix length.
pub fn num_virtual_tokens() -> usize {
    20
}
