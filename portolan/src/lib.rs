//! Portolan: the SVP v1 mapping service.
