//! Kernel command-line configuration (to be written).
