"""SGLD sampling of the localized, tempered posterior and LLC estimation. No Lightning import."""
