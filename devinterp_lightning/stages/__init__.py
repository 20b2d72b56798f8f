"""Changepoints, turning points and stages of scalar series. No Lightning import."""
