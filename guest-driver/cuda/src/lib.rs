//! Placeholder until the driver API lands.
