"""bitdet simulation: cocotb testbenches and runners."""
