//! Seeding: fills a node from a consistent snapshot of a healthy one.
