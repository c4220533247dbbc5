"""Real datasets (Fashion-MNIST, digits, ImageFolder) and the label-pool Dataset."""
