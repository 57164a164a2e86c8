"""What a pathologist opens: QuPath GeoJSON, heatmaps and their layout, saliency pictures, and the safe file writers every stage uses."""
