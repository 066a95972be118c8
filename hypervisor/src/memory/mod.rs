//! Physical memory bookkeeping (to be written).
