"""fastddpm: train and sample DDPM image models fast, with the reference math."""
