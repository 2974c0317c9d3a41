//! mmkd-vision
