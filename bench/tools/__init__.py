"""Stand-alone measurements run by hand: the GPU check, threads vs processes for decoding, weight stripping."""
