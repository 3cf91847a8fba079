"""Benchmarks: each prints its figure next to a baseline measured in the same run; figures quoted from
elsewhere (other systems' speeds) are printed as reference values, not measured here."""
