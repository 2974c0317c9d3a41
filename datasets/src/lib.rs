//! mmkd-datasets
