"""The digits experiment: DIDR vs DI++ vs DI* on real 8x8 images with the project's UNet, on a CPU."""
