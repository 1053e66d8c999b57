"""What the emulated devices obey: the optical plant (fibres, switches, loss), vendor QKD profiles (rate from loss, QBER), the SP 800-90B health tests of an entropy source."""
