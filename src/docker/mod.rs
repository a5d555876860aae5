//! The Docker Remote API (see DESIGN "Repository layout").

pub mod archive;
pub mod images;
pub mod layers;
