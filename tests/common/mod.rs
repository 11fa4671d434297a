//! What the engine suites split over several files share, one module per family of suites
//! (`start`); each test binary compiles all of it and uses its part.

#![allow(dead_code)]

pub(crate) mod start;
