"""TF SavedModel export."""
