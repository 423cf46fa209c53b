"""Tools around the product that are not its core: the demo and the
throwaway-blksnapd sandbox that the demo, the tests and the benchmarks use."""
